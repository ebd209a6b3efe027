"""The simulated judge: answers mpr's LLM prompts from qrels over a real OpenAI-compatible server.

For tests, demos and studies without LLM weights. No stage imports it; `mpr run` starts it when an
experiment names no LLM server.
"""
