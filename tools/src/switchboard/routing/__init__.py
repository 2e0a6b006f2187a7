"""The router's learned gate: its data (`switchboard router build-data`), training and evaluation.

`dataset` (no torch) reads and writes the scored prompts; `recipes` holds the data recipe;
`build_data` (torch) cuts prompts from held-out text and scores them with every expert's real
model; `report` summarises a dataset; `cli` is `switchboard router`. Importing this package
imports none of them.
"""
