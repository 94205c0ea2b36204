"""HTTP blueprints: each view parses input, calls one service function and shapes the output."""
