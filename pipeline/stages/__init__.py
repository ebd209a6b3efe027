"""The stages: mine (with encode, search), ingest, relabel (with audit, zone), synth, evaluate."""
