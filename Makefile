# The template's own commands. Both work on a fresh machine with Python 3.11 and network access
# to PyPI; the test environment is shared by every bake and cached under ~/.cache.
PYTHON ?= python3.11
CACHE ?= $(HOME)/.cache/llm-service-template
ENV ?= $(CACHE)/venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# Three pytest-xdist workers on 2 cores: two lead the whole rendered suites (one engine thread
# each), the third runs the light checks beside them, whose waits on subprocesses would leave a
# core idle if they ran after (a quarter of it, measured in .ci/run). JOBS=0: one process.
JOBS ?= 3
DEMO ?= build/demo

.PHONY: env test demo lint clean

# Rebuilt when the test tools or the rendered project's dependencies change: keyed on their
# content, not their mtime, which a fresh clone (CI) always makes newer than any stamp.
DEPS_HASH := $(shell cat tests/requirements.txt '{{cookiecutter.project_slug}}/pyproject.toml' | sha256sum | cut -c1-16)
STAMP := $(ENV)/.stamp-$(DEPS_HASH)

env: $(STAMP)

$(STAMP):
	rm -f $(ENV)/.stamp*
	$(PYTHON) -m venv $(ENV)
	$(ENV)/bin/python -m pip install --quiet --upgrade pip
	$(ENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(ENV)/bin/python -m pip install --quiet -r tests/requirements.txt
	$(ENV)/bin/python tests/project_requirements.py $(ENV)/project-requirements.txt
	$(ENV)/bin/python -m pip install --quiet -r $(ENV)/project-requirements.txt
	touch $@

test: env ## lint the template's code, then bake every combination of options and test each bake
	$(ENV)/bin/ruff check hooks tests
	$(ENV)/bin/ruff format --check hooks tests
	$(ENV)/bin/python -m pytest $(if $(filter-out 0,$(JOBS)),-n $(JOBS) --dist worksteal) $(PYTEST_ARGS)

demo: env ## render the default project into $(DEMO) and run its main job
	rm -rf $(DEMO)
	$(ENV)/bin/cookiecutter . --no-input --output-dir $(DEMO)
	$(MAKE) -C $(DEMO)/llm-service install run

lint: env
	$(ENV)/bin/ruff check hooks tests
	$(ENV)/bin/ruff format --check hooks tests

clean:
	rm -rf build $(ENV)
