"""Facts every side of Heady uses: the Worker (src/), the operator CLI (heady_cli) and the node
package (heady_node). One copy each, so the gateway, `heady probe` and the notebook cannot
disagree. Pure Python: it runs in CPython 3.12/3.13 and in the Worker's Pyodide alike.
"""
