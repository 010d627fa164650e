from setuptools import find_packages, setup

# PyTorch, TensorFlow and Horovod are installed by scripts/setup.sh (`make setup`):
# Horovod must be built against the exact framework versions, and GPU sites keep their own torch.
setup(
    name="hvdtrain",
    version="0.1.0",
    description="Data-parallel training with Horovod on Slurm clusters, and int8 export for edge devices",
    packages=find_packages(include=["hvdtrain", "hvdtrain.*"]),
    package_data={"hvdtrain.bench": ["netns/hosts.sh"]},
    python_requires=">=3.9",
    install_requires=[
        "numpy",
        "h5py",
        "mpi4py",
        "scikit-learn",
        "tqdm",
        "matplotlib",
        "pyyaml",
        "pydantic>=2",
        "onnx",
        "onnxruntime",
        "ai-edge-litert",
        "numba",
        "scipy",
        "threadpoolctl",
        "tensorboard",
    ],
    extras_require={
        "dev": ["pytest", "hypothesis", "spython"],
    },
    entry_points={"console_scripts": ["hvdtrain=hvdtrain.cli:main"]},
)
