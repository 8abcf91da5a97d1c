"""Running a model: the model store and prepared-weight cache, loading a model into a compiled
runtime (``loading``), the runtime itself (``model_runtime``: prefill, batched decode, scoring
over TVM's paged KV cache) and the generation engine (``engine``: continuous batching). Never
imports the HTTP layer."""
