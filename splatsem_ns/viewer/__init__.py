"""The semantic query panel of ns-viewer (query_panel) and the query maths it uses (relevancy)."""
