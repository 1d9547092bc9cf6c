"""Two-process DDS check of the venv's ROS 2 layer: VENV/bin/python ros_interfaces/check_pubsub.py

This process publishes a tf2_msgs/TFMessage and a vision_msgs/LabelInfo; a second interpreter
(the same script with --sub) subscribes and reports what it received. Both run rclpy over Fast
DDS (rmw_fastrtps_cpp) on a random ROS_DOMAIN_ID with ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST,
so nothing leaves the machine and parallel runs do not meet. Exits 0 when the subscriber got
both messages intact and the graph reports the official type hashes; non-zero otherwise.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

TF_TOPIC = "/c2s_check/tf"
LABEL_TOPIC = "/c2s_check/label_info"
OFFICIAL_HASH = {
    TF_TOPIC: "RIHS01_e369d0f05a23ae52508854b66f6aa0437f3449d652e8cbf22d5abe85d020f087",
    LABEL_TOPIC: "RIHS01_3d37df4015cdf660cc851c51897f2acd957e1ca6205ba0a99aebffb9406b0783",
}
TIMEOUT_S = 30.0


def subscriber() -> int:
    import rclpy
    from tf2_msgs.msg import TFMessage
    from vision_msgs.msg import LabelInfo

    rclpy.init()
    node = rclpy.create_node("c2s_check_sub")
    got: dict[str, object] = {}

    def on_tf(msg: TFMessage) -> None:
        t = msg.transforms[0]
        got["tf"] = [t.header.frame_id, t.child_frame_id, t.transform.translation.x,
                     t.transform.rotation.w]

    def on_label(msg: LabelInfo) -> None:
        got["label"] = [[c.class_id, c.class_name] for c in msg.class_map] + [msg.threshold]

    node.create_subscription(TFMessage, TF_TOPIC, on_tf, 10)
    node.create_subscription(LabelInfo, LABEL_TOPIC, on_label, 10)
    print("ready", flush=True)
    deadline = time.monotonic() + TIMEOUT_S
    while len(got) < 2 and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.1)
    print(json.dumps(got), flush=True)
    node.destroy_node()
    rclpy.shutdown()
    return 0 if len(got) == 2 else 1


def publisher() -> int:
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(1, 101)))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    child = subprocess.Popen([sys.executable, __file__, "--sub"], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        child.kill()
        print("check_pubsub: subscriber process did not start", file=sys.stderr)
        return 1

    import rclpy
    from geometry_msgs.msg import TransformStamped
    from rclpy.utilities import get_rmw_implementation_identifier
    from tf2_msgs.msg import TFMessage
    from vision_msgs.msg import LabelInfo, VisionClass

    rclpy.init()
    node = rclpy.create_node("c2s_check_pub")
    tf_pub = node.create_publisher(TFMessage, TF_TOPIC, 10)
    label_pub = node.create_publisher(LabelInfo, LABEL_TOPIC, 10)
    t = TransformStamped()
    t.header.frame_id, t.child_frame_id = "lidar", "camera"
    t.transform.translation.x, t.transform.rotation.w = 1.5, 1.0
    label = LabelInfo(class_map=[VisionClass(class_id=0, class_name="car"),
                                 VisionClass(class_id=65535, class_name="unlabeled")],
                      threshold=0.25)
    deadline = time.monotonic() + TIMEOUT_S
    while child.poll() is None and time.monotonic() < deadline:
        tf_pub.publish(TFMessage(transforms=[t]))
        label_pub.publish(label)
        rclpy.spin_once(node, timeout_sec=0.1)
    hashes = {topic: str(info[0].topic_type_hash) if info else None
              for topic in OFFICIAL_HASH
              for info in [node.get_publishers_info_by_topic(topic)]}
    rmw = get_rmw_implementation_identifier()
    node.destroy_node()
    rclpy.shutdown()
    try:
        out, _ = child.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        child.kill()
        out, _ = child.communicate()
    got = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    want = {"tf": ["lidar", "camera", 1.5, 1.0],
            "label": [[0, "car"], [65535, "unlabeled"], 0.25]}
    ok = child.returncode == 0 and got == want and hashes == OFFICIAL_HASH
    print(f"check_pubsub: rmw={rmw} ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']} "
          f"ROS_AUTOMATIC_DISCOVERY_RANGE={os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE']}: "
          f"received={got} type_hashes_official={hashes == OFFICIAL_HASH} -> "
          f"{'ok' if ok else 'FAILED'}")
    if hashes != OFFICIAL_HASH:
        print(f"check_pubsub: type hashes on the graph: {hashes}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(subscriber() if sys.argv[1:] == ["--sub"] else publisher())
