"""nginx in front of the app instances: the config template, its renderer and the instance launcher."""
