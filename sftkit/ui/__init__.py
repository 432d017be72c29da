"""Notebook views (ipywidgets + plotly), each a thin object over a core or engine object."""
