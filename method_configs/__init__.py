"""nerfstudio MethodSpecifications that the plugin registers through entry points."""
