"""The simulated judge: answers mpr's LLM prompts from qrels over a real OpenAI-compatible server.

For tests, demos and studies without LLM weights. No stage imports it; `mpr run` starts it when an
experiment names no LLM server. Everything outside this package imports it from here.
"""

from mpr.simulated_judge.oracle import (
    ANSWERED_SCHEMAS,
    SYNTH_MARKERS,
    Oracle,
    UnknownPrompt,
    oracle_responder,
    synthetic_grade,
)
from mpr.simulated_judge.responders import (
    ResponderAnswer,
    default_responder,
    load_responder,
    minimal_instance,
)
from mpr.simulated_judge.server import ChatServer, Faults, ServerHandle, main, start_server

__all__ = [
    "ANSWERED_SCHEMAS",
    "SYNTH_MARKERS",
    "ChatServer",
    "Faults",
    "Oracle",
    "ResponderAnswer",
    "ServerHandle",
    "UnknownPrompt",
    "default_responder",
    "load_responder",
    "main",
    "minimal_instance",
    "oracle_responder",
    "start_server",
    "synthetic_grade",
]
