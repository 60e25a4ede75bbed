"""Operator command line for the Heady cluster: `heady probe | secrets | status`."""
