"""RabbitMQ: the topology, the worker that serves requests and the client that sends them."""
