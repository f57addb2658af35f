"""vmorch's command line: parse, build operations, call the orchestrator's client, print."""
