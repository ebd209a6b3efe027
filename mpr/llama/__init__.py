"""llama.cpp on this machine: the `llama-server` binary, the default GGUF model, the server process."""
