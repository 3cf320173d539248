"""What bench.py runs: prompt sets (prompts.py), the systems it compares (systems.py), step costs on
random weights (cost_only.py), and the report: table, JSON, plot (report.py)."""
