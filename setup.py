"""ament_python package ``clip2scene_ros``; also ``pip install -e .`` outside ROS."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "clip2scene_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    description="CLIP2Scene open-vocabulary LiDAR segmentation for ROS 2",
    packages=find_packages(include=["clip2scene_core", "clip2scene_core.*",
                                    "clip2scene_ros", "clip2scene_ros.*",
                                    "training", "training.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
        (f"share/{PACKAGE}/rviz", glob("rviz/*.rviz")),
    ],
    package_data={"clip2scene_core": ["data/*"]},
    include_package_data=True,
    install_requires=["setuptools"],
    python_requires=">=3.10",
    zip_safe=False,
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            # ROS 2 executables (ros2 run clip2scene_ros <name>)
            "clip2scene_segmenter = clip2scene_ros.node:main",
            "clip2scene_segmenter_managed = clip2scene_ros.node:main_managed",
            "replay = clip2scene_ros.replay:main",
            # the same tools under CLI names for use outside ROS
            "clip2scene-replay = clip2scene_ros.replay:main",
            "clip2scene-segment = clip2scene_core.cli:main",
            # offline: training, dataset → bag converters, the end-to-end demo
            "clip2scene-pretrain = training.pretrain:main",
            "clip2scene-finetune = training.finetune:main",
            "clip2scene-evaluate = training.evaluate:main",
            "clip2scene-nuscenes-to-bag = training.tools.nuscenes_to_bag:main",
            "clip2scene-semantickitti-to-bag = training.tools.semantickitti_to_bag:main",
            "clip2scene-demo = training.demo:main",
        ],
    },
)
