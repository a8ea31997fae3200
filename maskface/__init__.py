"""maskface: the machinery behind train.py, inference.py, ensemble_csv.py, experiments.py, tune.py
and benchmark.py, one concern per module. docs/layout.md maps the modules and who may import whom.
"""
