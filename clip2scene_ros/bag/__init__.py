"""rosbag2 (mcap, sqlite3) and ROS 1 bag reading, salvage of damaged bags, rosbag2 writing.

One job per module:

- ``types``          message-type and topic names, :class:`BagError`, :class:`ReadReport`
- ``reader``         :class:`BagReader`: rosbags for healthy bags, salvage for damaged ones
- ``mcap_salvage``   record scan of a damaged mcap: summary / chunk index, or front to back
- ``mcap_records``   exact-range record walks on the ``mcap`` library's StreamReader, cut chunks
- ``sqlite_salvage`` row-by-row read of a damaged rosbag2 sqlite3 file
- ``ros1_salvage``   record scan of a ROS 1 bag without its index
- ``safe_output``    the writer's mark and the safe ``--overwrite`` of an output bag
- ``writer``         :class:`BagWriter` (rosbag2) and :func:`write_ros1_bag`

Typestores and message conversion live in :mod:`clip2scene_ros.typestore` (shared with
``msgs.py``); they are re-exported here for the callers that always imported them from here.
"""
from __future__ import annotations

from ..typestore import convert_message, default_typestore, normalize_msgtype
from .reader import BagReader
from .safe_output import (WRITER_MARK, WRITER_MARK_KEY, check_output_bag, os_error_text,
                          prepare_output_bag)
from .types import (CAMERA_INFO, COMPRESSED_IMAGE, IMAGE, KIND_TYPES, LABEL_CLASSES_TOPIC,
                    LABELS_TOPIC, MCAP_MAGIC, POINTCLOUD2, ROS1_MAGIC, STRING,
                    TF_MESSAGE, BagError, BagMessage, ReadReport, load_yaml_no_aliases)
from .writer import BagWriter, latched_qos, write_ros1_bag

__all__ = [
    "CAMERA_INFO", "COMPRESSED_IMAGE", "IMAGE", "KIND_TYPES", "LABEL_CLASSES_TOPIC",
    "LABELS_TOPIC", "MCAP_MAGIC", "POINTCLOUD2", "ROS1_MAGIC", "STRING", "TF_MESSAGE",
    "WRITER_MARK", "WRITER_MARK_KEY",
    "BagError", "BagMessage", "BagReader", "BagWriter", "ReadReport",
    "check_output_bag", "convert_message", "default_typestore", "latched_qos",
    "load_yaml_no_aliases", "normalize_msgtype", "os_error_text", "prepare_output_bag",
    "write_ros1_bag",
]
