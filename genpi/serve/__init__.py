"""`genpi serve`: an OpenAI-compatible server for a catalog's adapters, split as vLLM splits its OpenAI
entrypoints: `protocol` (requests, responses, errors), `scheduler` (the adapters and the embedded engine's jobs),
`app` (routes, SSE, /health), `vllm` (vLLM's own server as genpi's child) and `cli` (`genpi serve`'s flags)."""
