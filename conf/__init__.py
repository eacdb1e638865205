"""Configuration files shipped with depsim (YAML, prompts, the bundled synthetic logs)."""
