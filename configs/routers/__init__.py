"""Router comparison configs: every router at matched active compute.

See `recipe.py` for the shared settings and the naming scheme.
"""
