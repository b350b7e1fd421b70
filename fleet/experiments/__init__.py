"""Experiments behind `fleet experiment ...`: each returns a JSON-able dict and can write plots and tables."""
