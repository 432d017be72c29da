"""Pure-Python layer: configs, templates, policies, run store, statistics.

Imports neither torch nor ipywidgets (a test walks the imports to keep it so).
"""
