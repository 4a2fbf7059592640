"""The AMCT flows (QAT, PTQ, convert): compose passes, run the engine, write the output files."""
