"""Backend adapters: each module exposes ``unavailable_reason``, ``pool_forward`` and ``prepend``."""
