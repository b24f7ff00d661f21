"""The start-up hook of `hf-offload launch`: this folder goes first on PYTHONPATH, so its `sitecustomize` runs in
every Python process of the launched command. It is a package only so that it ships with hf_offload."""
