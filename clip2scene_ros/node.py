"""rclpy node ``clip2scene_segmenter``: thin glue between ROS and `PipelineRunner`.

Subscriptions feed the runner (LiDAR directly; each camera's Image/CompressedImage +
CameraInfo through a message_filters ApproximateTimeSynchronizer), an inference thread takes
the newest synchronised frame from its size-1 slot and publishes ``~/labeled_points`` and
``~/overlay/<camera>``; a timer publishes ``/diagnostics``. Everything that decides anything
(parameters, matching, dropping, conversion, statistics) lives in the pure modules
node_config / sync / pipeline / diagnostics, which are tested without ROS.
"""
from __future__ import annotations

import threading
from functools import partial
from typing import Any

import message_filters
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)
from rclpy.duration import Duration
from rclpy.exceptions import ParameterUninitializedException
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.time import Time
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from tf2_ros import Buffer, TransformException, TransformListener

from clip2scene_core.errors import Clip2SceneError

from .msgs import MessageFactory
from .node_config import NODE_NAME, NodeConfig, ParamSpec, camera_specs, from_parameters, parameter_specs
from .pipeline import PipelineRunner, build_pipeline, load_segmenter
from .tf import Tf2Backend, TfResolver

_PARAM_TYPES = {str: Parameter.Type.STRING, int: Parameter.Type.INTEGER,
                float: Parameter.Type.DOUBLE, bool: Parameter.Type.BOOL,
                list: Parameter.Type.STRING_ARRAY}


class SegmenterNode(Node):
    """Open-vocabulary LiDAR segmentation; see config/segment.yaml for the parameters."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self.pipeline = None
        self.cfg = self._load_parameters()
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self.factory = MessageFactory.from_rclpy()
        segmenter = load_segmenter(self.cfg.require_checkpoint(), self.cfg.device,
                                   self.cfg.clip_weights)
        self.pipeline = build_pipeline(self.cfg, segmenter, self.factory)
        self.tf_buffer = Buffer()
        # /tf is received by this node's executor; lookups block only the inference thread.
        # (spin_thread=True would move this node to the listener's own executor.)
        self.tf_listener = TransformListener(self.tf_buffer, self)
        # the same LiDAR → camera policy as the replay tool, over tf2 instead of a bag's TF
        self.tf_resolver = TfResolver(
            Tf2Backend(self.tf_buffer, lambda ns: Time(nanoseconds=ns),
                       Duration(seconds=self.cfg.tf_timeout), errors=(TransformException,)),
            self.cfg.fixed_frame, on_fallback=self._on_tf_fallback)
        self.runner = PipelineRunner(
            self.pipeline, self.cfg.cameras, self.cfg.sync, tf_lookup=self.tf_resolver,
            clock=lambda: self.get_clock().now().nanoseconds, warn=self.get_logger().warning,
            warn_throttle_s=self.cfg.warn_throttle, device=str(segmenter.device),
            overlay_cameras=self._overlays_wanted)

        qos = qos_profile_sensor_data if self.cfg.qos == "sensor_data" else QoSProfile(
            depth=self.cfg.queue_size, reliability=ReliabilityPolicy.RELIABLE)
        self.cloud_pub = self.create_publisher(PointCloud2, "~/labeled_points", 10)
        self.overlay_pubs = {
            cam.name: self.create_publisher(Image, f"~/overlay/{cam.name}", 10)
            for cam in self.cfg.camera_list} if self.cfg.publish_overlays else {}
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)

        self.cloud_sub = self.create_subscription(PointCloud2, self.cfg.lidar_topic,
                                                  self.runner.on_cloud, qos)
        self.camera_syncs = []
        for cam in self.cfg.camera_list:
            image_type = CompressedImage if cam.transport == "compressed" else Image
            subs = [message_filters.Subscriber(self, image_type, cam.image_topic, qos_profile=qos),
                    message_filters.Subscriber(self, CameraInfo, cam.info_topic, qos_profile=qos)]
            pair = message_filters.ApproximateTimeSynchronizer(subs, self.cfg.queue_size,
                                                               self.cfg.slop)
            pair.registerCallback(partial(self._on_camera, cam.name, cam.optical_frame))
            self.camera_syncs.append((subs, pair))

        # releases sweeps whose cameras went quiet, even when no new message arrives
        self.sync_timer = self.create_timer(max(0.01, min(0.1, self.cfg.camera_timeout / 4)),
                                            self.runner.on_timer)
        self.diag_timer = self.create_timer(self.cfg.diagnostics_period, self._publish_diagnostics)
        self._worker = threading.Thread(target=self._work, name="clip2scene_inference", daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"segmenting {self.cfg.lidar_topic} on {segmenter.device} with "
            f"{len(self.pipeline.class_names)} classes; cameras: "
            f"{[(c.name, c.image_topic, c.info_topic) for c in self.cfg.camera_list] or 'none'}")

    # -- parameters ------------------------------------------------------------------------
    def _declare(self, spec: ParamSpec) -> Any:
        descriptor = ParameterDescriptor(description=spec.description, read_only=not spec.dynamic)
        if spec.choices:
            descriptor.additional_constraints = "one of: " + ", ".join(spec.choices)
        if spec.type is float and spec.min is not None:
            descriptor.floating_point_range = [FloatingPointRange(
                from_value=float(spec.min), to_value=float(spec.max), step=0.0)]
        if spec.type is int and spec.min is not None:
            descriptor.integer_range = [IntegerRange(
                from_value=int(spec.min), to_value=int(spec.max), step=1)]
        if spec.type is list and not spec.default:
            # an empty list has no type of its own: declare the type, read "unset" as []
            self.declare_parameter(spec.name, _PARAM_TYPES[list], descriptor)
        else:
            self.declare_parameter(spec.name, spec.default, descriptor)
        try:
            value = self.get_parameter(spec.name).value
        except ParameterUninitializedException:
            value = None
        return spec.default if value is None else (list(value) if spec.type is list else value)

    def _load_parameters(self) -> NodeConfig:
        values = {spec.name: self._declare(spec) for spec in parameter_specs()}
        for name in values["cameras"]:
            for spec in camera_specs(name):
                values[spec.name] = self._declare(spec)
        return from_parameters(values)   # ConfigError names the bad parameter

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        for param in params:
            if param.name == "class_names" and self.pipeline is not None:
                names = list(param.value or [])
                reason = self.pipeline.check_class_names(names)
                if reason:
                    return SetParametersResult(successful=False, reason=reason)
                self.pipeline.set_class_names(names)
                self.get_logger().info(f"class_names → {names or 'checkpoint vocabulary'} "
                                       "(from the next frame)")
        return SetParametersResult(successful=True)

    # -- callbacks -------------------------------------------------------------------------
    def _on_camera(self, name: str, optical_frame: str, image: Any, info: Any) -> None:
        self.runner.on_camera(name, image, info, optical_frame)

    def _on_tf_fallback(self, text: str) -> None:
        self.runner.warn_throttled("tf_fallback", text)

    def _overlays_wanted(self) -> set[str]:
        """Cameras whose overlay topic has a subscriber (drawing 1600×900 images costs)."""
        return {name for name, pub in self.overlay_pubs.items() if pub.get_subscription_count() > 0}

    def _work(self) -> None:
        while rclpy.ok() and not self.runner.slot.closed:
            out = self.runner.step(timeout=0.2)
            if out is None:
                continue
            if out.cloud is not None:
                self.cloud_pub.publish(out.cloud)
            for name, image in out.overlays.items():
                if name in self.overlay_pubs:
                    self.overlay_pubs[name].publish(image)

    def _publish_diagnostics(self) -> None:
        report = self.runner.diagnostics()
        status = DiagnosticStatus(name=f"{self.get_name()}: segmentation",
                                  hardware_id=report.values.get("device", ""),
                                  message=report.message,
                                  values=[KeyValue(key=k, value=v) for k, v in report.values.items()])
        status.level = bytes([report.level])
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self.diag_pub.publish(msg)

    def shutdown(self) -> None:
        """Stop the inference thread (called before destroy_node)."""
        if getattr(self, "runner", None) is not None:
            self.runner.close()
            self._worker.join(timeout=5.0)


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args)
    node = None
    code = 0
    try:
        node = SegmenterNode()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Clip2SceneError as exc:   # bad parameter / checkpoint: say why and exit non-zero
        rclpy.logging.get_logger(NODE_NAME).fatal(f"cannot start: {exc}")
        code = 1
    finally:
        if node is not None:
            node.shutdown()
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
