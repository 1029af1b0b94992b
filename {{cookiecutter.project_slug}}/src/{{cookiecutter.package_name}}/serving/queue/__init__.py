"""RabbitMQ: the topology, the worker that serves requests, the client and `submit` that send
them, and the dead-letter queue's reader."""
