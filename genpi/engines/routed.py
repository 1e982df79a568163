"""Whole models served beside a base's adapters, under names as adapters are (a full fine-tune's model folder).

    engine = WithModels(base_engine, {"kld__os": TransformersEngine("ADAPTERS/os")})
    engine.generate(requests, adapters=["kld__os", "genpi__os", None])   # each request to its model

The evaluations and the server address a system by its adapter name on one engine: `serving(name)`,
`submit(request, name)`, `generate(requests, adapters=names)`, and `engine.model` within `serving`. `WithModels`
keeps that interface: a name of one of `models` goes to that model's own engine (its own weights, its own worker
and batch), any other name (an adapter, None: the base) to the base engine. Everything else (tokenizer, device,
pad id, counters) is the base engine's: a full fine-tune keeps the base's tokenizer and architecture.
"""

from __future__ import annotations

from contextlib import contextmanager

from genpi.engines.hf import SERVING


class WithModels:
    def __init__(self, base, models: dict):
        for name, engine in models.items():
            if engine.tokenizer.get_vocab() != base.tokenizer.get_vocab():
                raise ValueError(f"model {name!r} has another tokenizer than the base: it cannot share its evaluation")
        self.base, self.models = base, dict(models)
        self._serving: str | None | object = SERVING

    def __getattr__(self, name):  # only for what this class does not define: the base engine's
        return getattr(self.__dict__["base"], name)

    @property
    def model(self):
        """The model `serving` set: a whole model's, else the base's (with its adapters)."""
        return self.models[self._serving].model if self._serving in self.models else self.base.model

    @model.setter
    def model(self, value) -> None:  # e.g. efficiency adding a fresh LoRA to the base
        self.base.model = value

    @contextmanager
    def serving(self, name: str | None):
        previous, self._serving = self._serving, name
        try:
            if name in self.models:
                yield
            else:
                with self.base.serving(name):
                    yield
        finally:
            self._serving = previous

    def submit(self, request, adapter=SERVING, stream=None):
        if adapter is SERVING:
            adapter = self._serving
        if adapter in self.models:
            return self.models[adapter].submit(request, None, stream)
        return self.base.submit(request, adapter, stream)

    def generate(self, requests, adapters=None, streams=None):
        """One completion per request, in order; the requests of each engine batched on it, all at once."""
        futures = [
            self.submit(r, SERVING if adapters is None else adapters[i], None if streams is None else streams[i])
            for i, r in enumerate(requests)
        ]
        return [f.result() for f in futures]

    def close(self, abandon: bool = False) -> None:
        for engine in (self.base, *self.models.values()):
            engine.close(abandon=abandon)
