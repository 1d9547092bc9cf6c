"""Dataset → rosbag2 converters: ``nuscenes_to_bag``, ``semantickitti_to_bag`` (CLIs
``clip2scene-nuscenes-to-bag``, ``clip2scene-semantickitti-to-bag``).

``sample_bag.SampleBagWriter`` lays a dataset ``Sample`` out as a robot would record it (topics,
frames, ground truth: see that module); ``converter_cli`` holds what the CLIs share.
"""
