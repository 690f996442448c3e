"""The HTTP layer: thin routes over ``AppState`` (deps), upload parsing (media), the translate pipeline
(inference) and pure ASGI middleware. Nothing here touches onnxruntime directly."""
