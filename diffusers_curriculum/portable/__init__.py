"""Code that ships inside saved pipelines.

Each module here is self-contained (torch, diffusers, safetensors, huggingface_hub; never
``diffusers_curriculum``): :func:`diffusers_curriculum.export.make_portable` copies it into a saved folder,
where diffusers' custom-code route (``trust_remote_code=True``) loads it for users without this package.
"""
