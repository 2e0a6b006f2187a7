"""`switchboard bench`: replay request traces against Switchboard or an OpenAI-compatible server.

Modules: `workload` (trace formats and synthetic arrivals), `transform` (window, time and
length scaling), `corpus` and `prompts` (prompt text of exact token length), `targets`
(gRPC and SSE clients), `runner` (open-loop replay), `stats`, `results`, `report`, `plots`,
`compare` and `cli`.
"""
