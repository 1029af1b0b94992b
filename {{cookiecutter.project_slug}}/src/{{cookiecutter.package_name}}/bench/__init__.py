"""The benchmark: every engine and the worker on one prompt set, as ratios to a naive baseline.
It may import the layers below it and the base modules, never `cli`."""
