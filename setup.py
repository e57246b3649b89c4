from setuptools import setup

extras = {
    "xformers": ["xformers>=0.0.23"],
    "nash": ["cvxpy>=1.4"],  # only to cross-check the built-in Nash solver
    "inception": ["torch-fidelity>=0.3"],  # real-Inception FID where its weights exist locally
    "dev": ["pytest>=7.0", "pytest-timeout>=2.1", "scikit-learn>=1.2", "cvxpy>=1.4"],
}

setup(
    name="diffusers-curriculum",
    version="0.1.0.dev0",
    description="Timestep-aware training regimes (curriculum, clustered multi-task, TDC) for Hugging Face Diffusers.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=["diffusers_curriculum", "diffusers_curriculum.portable", "diffusers_curriculum.regimes", "diffusers_curriculum.model_cards"],
    # The card templates live in the top-level model_cards/ folder and ship inside the package.
    package_dir={"diffusers_curriculum": "diffusers_curriculum", "diffusers_curriculum.model_cards": "model_cards"},
    package_data={"diffusers_curriculum.model_cards": ["*.md"]},
    install_requires=[
        "torch>=2.1,<3",
        "diffusers>=0.30",
        "transformers>=4.40",
        "accelerate>=0.30",
        "datasets>=2.18",
        "safetensors>=0.4",
        "huggingface_hub>=0.23",
        "numpy",
        "Pillow",
        "tqdm",
        "matplotlib",
        "tensorboard",
        "jinja2",
        "torchmetrics>=1.0",
        "torch-pruning>=1.5",
        "peft>=0.7",  # LoRA in train_text_to_image.py
    ],
    extras_require=extras,
    entry_points={"console_scripts": ["diffusers-curriculum-difficulty=diffusers_curriculum.difficulty:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
