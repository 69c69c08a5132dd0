"""Model quality: the lm-eval suites, the release gates and their result types."""
