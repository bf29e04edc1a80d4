"""inferline: a model-serving platform. Gateway -> Redis Streams -> batching workers."""

__version__ = "0.1.0"
