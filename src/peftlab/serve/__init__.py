"""Serving a base model and many adapters: ``peftlab serve`` (OpenAI-compatible HTTP) and ``peftlab chat``.

``mixed_lora`` (rows of different LoRA adapters in one forward), ``adapters`` (named adapters, loaded
on demand, LRU eviction), ``engine`` (continuous batching), ``protocol`` (OpenAI request and response
shapes), ``app`` (the FastAPI routes), ``server`` (assembling them and running uvicorn).
"""
