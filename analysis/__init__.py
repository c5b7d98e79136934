"""analysis: prediction consistency, t-SNE, mean attention distance, paper-style tables and figures."""
