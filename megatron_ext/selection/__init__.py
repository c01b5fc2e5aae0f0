"""Offline data selection: LADM contextual-dependency scoring (``ladm/``) and LongRecipe's
impactful-token analysis and sentence selection (``longrecipe/``)."""
