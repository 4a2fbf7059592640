"""Graph rewrites and analyses on ``model.graph.Graph``: quantizable layers, fusion, retrain insertion."""
