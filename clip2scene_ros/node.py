"""rclpy nodes ``clip2scene_segmenter`` (plain) and ``clip2scene_segmenter_managed`` (lifecycle).

(Over ~400 lines: the only rclpy module; the plain and lifecycle nodes share their wiring, and
rclpy must stay out of every other module.)

Thin glue between ROS and `PipelineRunner`: subscriptions feed the runner, an inference
thread takes the newest synchronised frame from its size-1 slot and publishes
``~/labeled_points`` (+ ``~/filtered_points``, ``~/overlay/<camera>``), a timer publishes
``/diagnostics``, and ``~/label_info`` / ``~/label_classes`` (latched) say what the labels
mean. Everything that decides anything (parameters, pairing, matching, dropping, conversion,
statistics) lives in the pure modules node_config / sync / pipeline / diagnostics / tf /
label_info, which are tested without ROS.

Optional ROS packages are used when present and replaced by project code otherwise:
- ``tf2_ros``: its Buffer + TransformListener; without it (rclpy from pip) the node
  subscribes to ``/tf`` and ``/tf_static`` itself into a `ListenerBuffer` (waiting lookups);
- ``message_filters``: its ApproximateTimeSynchronizer pairs image + CameraInfo when
  ``camera_info_policy`` is ``synchronized``; without it, `CameraInfoPairing` does;
- ``vision_msgs``: ``~/label_info`` (LabelInfo) is published only where it is installed.
"""
from __future__ import annotations

import importlib
import signal
import threading
from functools import partial
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)
from rclpy.duration import Duration
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import (DurabilityPolicy, QoSPolicyKind, QoSProfile, ReliabilityPolicy,
                       qos_profile_sensor_data)
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.signals import SignalHandlerOptions
from rclpy.time import Time
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import String

from clip2scene_core.errors import Clip2SceneError, ConfigError, TransformError
from clip2scene_core.threads import prepare_openmp

from .label_info import label_classes_json, label_info_entries
from .msgs import MessageFactory
from .node_config import (NODE_NAME, NodeConfig, ParamSpec, camera_specs, check_type,
                          from_parameters, parameter_specs, to_parameters)
from .pipeline import build_pipeline, load_segmenter
from .runner import PipelineRunner
from .sync import PAIR_SYNCHRONIZED
from .tf import ListenerBuffer, Tf2Backend, TfResolver

#: latched: late subscribers still get the current vocabulary
LATCHED_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
#: CameraInfo subscriptions may also override durability (a latched CameraInfo publisher)
_INFO_QOS_POLICIES = (QoSPolicyKind.HISTORY, QoSPolicyKind.DEPTH, QoSPolicyKind.RELIABILITY,
                      QoSPolicyKind.DURABILITY)


def optional_module(name: str) -> Any:
    """An optional ROS package (tf2_ros, message_filters, vision_msgs.msg), or None."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


class SegmenterMixin:
    """What the plain and the managed node share; mixed into an rclpy ``Node``.

    Life cycle: `_declare_parameters` (construction) → `_configure` (model, TF, publishers)
    → `_activate` (subscriptions, timers, inference thread) → `_deactivate` → `_cleanup`.
    """

    # -- parameters ------------------------------------------------------------------------
    def _declare_parameters(self) -> NodeConfig:
        """Validate every override first (one ConfigError naming the parameter: unknown keys,
        wrong types — an integer is fine for a double —, ranges), then declare the validated
        values, so rclpy's own type check never sees ``1`` for ``1.0``."""
        self.pipeline = self.runner = self.segmenter = None
        self._worker: threading.Thread | None = None
        self._c2s_inputs: list[Any] = []
        self._c2s_timers: list[Any] = []
        self._c2s_publishers: list[Any] = []
        self._tf_subs: list[Any] = []
        self._announced: list[str] | None = None
        self._local = threading.local()
        overrides = {name: p.value for name, p in getattr(self, "_parameter_overrides", {}).items()
                     if p.value is not None}
        cfg = from_parameters(overrides)
        values = to_parameters(cfg)
        for spec in parameter_specs():
            self._declare(spec, values[spec.name])
        for cam in cfg.camera_list:
            for spec in camera_specs(cam.name):
                self._declare(spec, values[spec.name])
        self.add_on_set_parameters_callback(self._on_set_parameters)
        return cfg

    def _declare(self, spec: ParamSpec, value: Any) -> None:
        descriptor = ParameterDescriptor(description=spec.description, read_only=not spec.dynamic)
        if spec.choices:
            descriptor.additional_constraints = "one of: " + ", ".join(spec.choices)
        if spec.type is float and spec.min is not None:
            descriptor.floating_point_range = [FloatingPointRange(
                from_value=float(spec.min), to_value=float(spec.max), step=0.0)]
        if spec.type is int and spec.min is not None:
            descriptor.integer_range = [IntegerRange(
                from_value=int(spec.min), to_value=int(spec.max), step=1)]
        if spec.type is list and not value:
            # an empty list has no type in ROS: unset, but readable (GetParameters never fails)
            descriptor.dynamic_typing = True
            self.declare_parameter(spec.name, None, descriptor, ignore_override=True)
        else:
            self.declare_parameter(spec.name, value, descriptor, ignore_override=True)

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        for param in params:
            if param.name == "query":
                result = self._set_query(param)
                if not result.successful:
                    return result
                continue
            if param.name != "class_names" or getattr(self._local, "internal", False):
                continue
            try:
                names = [v.strip() for v in check_type(param.name, param.value, list)]
            except ConfigError as exc:
                return SetParametersResult(successful=False, reason=str(exc))
            if self.pipeline is None:
                return SetParametersResult(successful=False,
                                           reason="the model is not loaded (configure the node first)")
            if names == self.pipeline.original_class_names:
                names = []   # the checkpoint's own classes need no text encoder
            reason = self.pipeline.check_class_names(names)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
            self.pipeline.set_class_names(names)
            self.get_logger().info(f"class_names → {names or 'checkpoint vocabulary'} "
                                   "(from the next frame)")
        return SetParametersResult(successful=True)

    def _set_query(self, param: Parameter) -> SetParametersResult:
        """``query`` at run time: queued for the next frame, or refused with the reason (no
        text encoder and no embedding file, a text the file does not hold)."""
        try:
            text = check_type(param.name, param.value, str).strip()
            if self.pipeline is None:
                raise ConfigError("the model is not loaded (configure the node first)")
            self.pipeline.set_query(text)
        except Clip2SceneError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        self.cfg.query = text   # a managed node re-configured later keeps it
        self.get_logger().info(f"query → {text!r} (from the next frame)" if text
                               else "query cleared (from the next frame)")
        return SetParametersResult(successful=True)

    # -- configure: model, TF, publishers --------------------------------------------------
    def _configure(self) -> None:
        cfg = self.cfg
        self.factory = MessageFactory.from_rclpy()
        self.segmenter = load_segmenter(cfg.require_checkpoint(), cfg.device, cfg.clip_weights,
                                        cfg.cpu_threads, cfg.teacher_precision,
                                        cfg.sparse_precision)
        self.pipeline = build_pipeline(cfg, self.segmenter, self.factory)
        self.tf_resolver = TfResolver(self._tf_backend(), cfg.fixed_frame,
                                      on_fallback=self._on_tf_fallback)
        self.runner = PipelineRunner(
            self.pipeline, cfg.cameras, cfg.sync, tf_lookup=self.tf_resolver,
            clock=lambda: self.get_clock().now().nanoseconds, warn=self.get_logger().warning,
            warn_throttle_s=cfg.warn_throttle, device=str(self.segmenter.device),
            overlay_cameras=self._overlays_wanted, camera_info_policy=cfg.camera_info_policy,
            teacher_async=cfg.teacher_async, teacher_max_age=cfg.teacher_max_age)

        out_qos = (QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
                   if cfg.output_qos == "reliable" else qos_profile_sensor_data)
        overridable = QoSOverridingOptions.with_default_policies()
        self.cloud_pub = self._publisher(PointCloud2, "~/labeled_points", out_qos, overridable)
        self.filtered_pub = (self._publisher(PointCloud2, "~/filtered_points", out_qos, overridable)
                             if cfg.filter_classes else None)
        self.overlay_pubs = {
            cam.name: self._publisher(Image, f"~/overlay/{cam.name}", out_qos, overridable)
            for cam in cfg.camera_list} if cfg.publish_overlays else {}
        self.diag_pub = self._publisher(DiagnosticArray, "/diagnostics", 10)
        self.classes_pub = self._publisher(String, "~/label_classes", LATCHED_QOS)
        vision = optional_module("vision_msgs.msg")
        self._vision_msgs = vision
        self.label_info_pub = (self._publisher(vision.LabelInfo, "~/label_info", LATCHED_QOS)
                               if vision is not None else None)
        self._announce(self.pipeline.class_names)
        fields = [f.name + (" (while a query is set)" if f.optional else "") for f in self.pipeline.schema]
        self.get_logger().info(
            f"segmenting {cfg.lidar_topic} on {self.segmenter.device} with "
            f"{len(self.pipeline.class_names)} classes; ~/labeled_points fields: "
            f"{', '.join(fields)}; cameras: "
            f"{[(c.name, c.image_topic, c.info_topic) for c in cfg.camera_list] or 'none'}; "
            f"TF: {'tf2_ros' if self._tf2 is not None else 'own /tf listener'}")

    def _publisher(self, msg_type: Any, topic: str, qos: Any,
                   overriding: QoSOverridingOptions | None = None) -> Any:
        pub = self.create_publisher(msg_type, topic, qos, qos_overriding_options=overriding)
        self._c2s_publishers.append(pub)
        return pub

    def _tf_backend(self) -> Any:
        """tf2_ros when installed; otherwise our own listener on /tf + /tf_static."""
        timeout = self.cfg.tf_timeout
        self._tf2 = optional_module("tf2_ros")
        if self._tf2 is not None:
            self.tf_buffer = self._tf2.Buffer()
            # /tf is received by this node's executor; lookups block only the inference thread
            self.tf_listener = self._tf2.TransformListener(self.tf_buffer, self)
            return Tf2Backend(self.tf_buffer, lambda ns: Time(nanoseconds=ns),
                              Duration(seconds=timeout), errors=(self._tf2.TransformException,))
        self.tf_buffer = ListenerBuffer(timeout)
        self.tf_listener = None
        tf2_msgs = optional_module("tf2_msgs.msg")
        if tf2_msgs is None:
            self.get_logger().error("neither tf2_ros nor tf2_msgs is installed: no transform can "
                                    "be received, every camera will be skipped")
            return self.tf_buffer
        dynamic = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        static = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._tf_subs = [
            self.create_subscription(tf2_msgs.TFMessage, "/tf", self.tf_buffer.on_tf, dynamic),
            self.create_subscription(tf2_msgs.TFMessage, "/tf_static", self.tf_buffer.on_tf_static,
                                     static)]
        return self.tf_buffer

    # -- activate: inputs and the inference thread ----------------------------------------
    def _activate(self) -> None:
        cfg = self.cfg
        if hasattr(self.segmenter, "restore"):
            self.segmenter.restore()
        qos = qos_profile_sensor_data if cfg.qos == "sensor_data" else QoSProfile(
            depth=cfg.queue_size, reliability=ReliabilityPolicy.RELIABLE)
        overridable = QoSOverridingOptions.with_default_policies()
        info_overridable = QoSOverridingOptions(_INFO_QOS_POLICIES)
        self._c2s_inputs = [self.create_subscription(PointCloud2, cfg.lidar_topic, self.runner.on_cloud,
                                                 qos, qos_overriding_options=overridable)]
        filters = optional_module("message_filters") \
            if cfg.camera_info_policy == PAIR_SYNCHRONIZED else None
        for cam in cfg.camera_list:
            image_type = CompressedImage if cam.transport == "compressed" else Image
            if filters is not None:
                subs = [filters.Subscriber(self, image_type, cam.image_topic, qos_profile=qos),
                        filters.Subscriber(self, CameraInfo, cam.info_topic, qos_profile=qos)]
                pair = filters.ApproximateTimeSynchronizer(subs, cfg.queue_size, cfg.slop)
                pair.registerCallback(partial(self._on_camera_pair, cam.name, cam.optical_frame))
                self._c2s_inputs.append((subs, pair))
                continue
            self._c2s_inputs.append(self.create_subscription(
                image_type, cam.image_topic,
                partial(self.runner.on_image, cam.name, optical_frame=cam.optical_frame),
                qos, qos_overriding_options=overridable))
            self._c2s_inputs.append(self.create_subscription(
                CameraInfo, cam.info_topic, partial(self.runner.on_camera_info, cam.name),
                qos, qos_overriding_options=info_overridable))
        # releases sweeps whose cameras went quiet, even when no new message arrives
        self._c2s_timers = [
            self.create_timer(max(0.01, min(0.1, cfg.camera_timeout / 4)), self.runner.on_timer),
            self.create_timer(cfg.diagnostics_period, self._publish_diagnostics)]
        self.runner.reopen()
        self._worker = threading.Thread(target=self._work, name="clip2scene_inference", daemon=True)
        self._worker.start()

    def _on_camera_pair(self, name: str, optical_frame: str, image: Any, info: Any) -> None:
        self.runner.on_camera(name, image, info, optical_frame)

    def _deactivate(self) -> None:
        """Stop taking input and the inference thread; the model leaves the GPU."""
        for item in self._c2s_inputs:
            if isinstance(item, tuple):
                for sub in item[0]:
                    self.destroy_subscription(sub.sub)
            else:
                self.destroy_subscription(item)
        for timer in self._c2s_timers:
            self.destroy_timer(timer)
        self._c2s_inputs, self._c2s_timers = [], []
        self._stop_worker()
        if self.segmenter is not None and hasattr(self.segmenter, "offload"):
            self.segmenter.offload()

    def _cleanup(self) -> None:
        for pub in self._c2s_publishers:
            self.destroy_publisher(pub)
        for sub in self._tf_subs:
            self.destroy_subscription(sub)
        if getattr(self, "tf_listener", None) is not None and hasattr(self.tf_listener, "unregister"):
            self.tf_listener.unregister()
        self._c2s_publishers, self._tf_subs = [], []
        self.pipeline = self.runner = self.segmenter = None

    def _stop_worker(self) -> None:
        if self.runner is not None:
            self.runner.close()
        if self._worker is not None:
            self._worker.join(timeout=10.0)
            self._worker = None

    # -- callbacks -------------------------------------------------------------------------
    def _on_tf_fallback(self, text: str) -> None:
        self.runner.warn_throttled("tf_fallback", text)

    def _overlays_wanted(self) -> set[str]:
        """Cameras whose overlay topic has a subscriber (drawing 1600×900 images costs)."""
        return {name for name, pub in self.overlay_pubs.items() if pub.get_subscription_count() > 0}

    def _work(self) -> None:
        runner = self.runner
        while not runner.slot.closed:
            out = runner.step(timeout=0.2)
            if out is None:
                continue
            try:
                self._publish_output(out)
            except Exception as exc:  # noqa: BLE001 - never let the inference thread die
                if not self.context.ok():
                    return             # Ctrl-C: the context went away under us
                self.get_logger().error(f"publishing failed: {type(exc).__name__}: {exc}")

    def _publish_output(self, out: Any) -> None:
        if out.class_names and out.class_names != self._announced:
            self._announce(out.class_names)
        if out.cloud is not None:
            self.cloud_pub.publish(out.cloud)
        if self.filtered_pub is not None and getattr(out, "filtered_cloud", None) is not None:
            self.filtered_pub.publish(out.filtered_cloud)
        for name, image in out.overlays.items():
            if name in self.overlay_pubs:
                self.overlay_pubs[name].publish(image)

    def _announce(self, class_names: list[str]) -> None:
        """The vocabulary in effect → class_names parameter, ~/label_classes, ~/label_info."""
        names = list(class_names)
        self._announced = names
        self._local.internal = True
        try:
            self.set_parameters([Parameter("class_names", Parameter.Type.STRING_ARRAY, names)])
        finally:
            self._local.internal = False
        self.classes_pub.publish(String(data=label_classes_json(
            names, self.pipeline.palette(names))))
        if self.label_info_pub is not None:
            vm = self._vision_msgs
            msg = vm.LabelInfo(class_map=[vm.VisionClass(class_id=i, class_name=n)
                                          for i, n in label_info_entries(names)],
                               threshold=0.0)
            msg.header.stamp = self.get_clock().now().to_msg()
            self.label_info_pub.publish(msg)

    def _publish_diagnostics(self) -> None:
        report = self.runner.diagnostics()
        if isinstance(self.tf_buffer, ListenerBuffer) and self.tf_buffer.rejected:
            report.values["tf.rejected"] = str(self.tf_buffer.rejected)
        status = DiagnosticStatus(name=f"{self.get_name()}: segmentation",
                                  hardware_id=report.values.get("device", ""),
                                  message=report.message,
                                  values=[KeyValue(key=k, value=v) for k, v in report.values.items()])
        status.level = bytes([report.level])
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self.diag_pub.publish(msg)

    def shutdown(self) -> None:
        """Stop the inference thread (call before destroy_node)."""
        self._stop_worker()


class SegmenterNode(SegmenterMixin, Node):
    """Open-vocabulary LiDAR segmentation, running from construction on.

    See config/segment.yaml for the parameters.
    """

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self.cfg = self._declare_parameters()
        self._configure()
        self._activate()


def _lifecycle_node_class() -> type:
    from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn

    class ManagedSegmenterNode(SegmenterMixin, LifecycleNode):
        """The managed variant: configure loads the model, activate starts processing,
        deactivate stops it (model moved off the GPU), cleanup unloads it."""

        def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
            super().__init__(node_name, **kwargs)
            self.cfg = self._declare_parameters()

        def _publisher(self, msg_type, topic, qos, overriding=None):
            pub = self.create_lifecycle_publisher(msg_type, topic, qos,
                                                  qos_overriding_options=overriding)
            self._c2s_publishers.append(pub)
            return pub

        def _announce(self, class_names):
            # latched topics must carry the vocabulary even while inactive
            for pub in (self.classes_pub, self.label_info_pub):
                if pub is not None:
                    pub.on_activate(None)
            super()._announce(class_names)

        def on_configure(self, state):
            try:
                self._configure()
            except Clip2SceneError as exc:
                self.get_logger().error(f"cannot configure: {exc}")
                self._cleanup()
                return TransitionCallbackReturn.FAILURE
            return super().on_configure(state)

        def on_activate(self, state):
            result = super().on_activate(state)
            self._activate()
            return result

        def on_deactivate(self, state):
            self._deactivate()
            return super().on_deactivate(state)

        def on_cleanup(self, state):
            self._cleanup()
            return super().on_cleanup(state)

        def on_shutdown(self, state):
            if self._worker is not None:
                self._deactivate()
            if self.pipeline is not None:
                self._cleanup()
            return super().on_shutdown(state)

        def _deactivate(self):
            if self._c2s_inputs or self._worker is not None:
                super()._deactivate()

    return ManagedSegmenterNode


def __getattr__(name: str) -> Any:
    if name == "ManagedSegmenterNode":   # rclpy.lifecycle is imported only when asked for
        return _lifecycle_node_class()
    raise AttributeError(name)


_START_ERRORS = (Clip2SceneError, ParameterException, TransformError)


def _run(make_node: Any, args: list[str] | None) -> int:
    """Init, spin until SIGINT/SIGTERM, shut down; 0 on a signal, 1 on a start-up error.

    rclpy's own SIGINT handler shuts the context down from inside the signal, which races
    with a message being taken (rclpy then raises from the invalidated context). Here the
    signal only sets a flag: the spin loop ends between callbacks, the inference thread is
    joined, and only then is the context shut down.
    """
    prepare_openmp()   # before torch loads: OpenMP workers must not spin on a shared core
    stop = threading.Event()
    handlers = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    node = None
    code = 0
    executor = SingleThreadedExecutor()
    try:
        node = make_node()
        executor.add_node(node)
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except _START_ERRORS as exc:   # bad parameter / checkpoint: one line, exit non-zero
        rclpy.logging.get_logger(NODE_NAME).fatal(f"cannot start: {exc}")
        code = 1
    finally:
        if node is not None:
            node.shutdown()
            executor.remove_node(node)
            node.destroy_node()
        executor.shutdown()
        rclpy.try_shutdown()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return code


def main(args: list[str] | None = None) -> int:
    """``ros2 run clip2scene_ros clip2scene_segmenter``."""
    return _run(SegmenterNode, args)


def main_managed(args: list[str] | None = None) -> int:
    """``ros2 run clip2scene_ros clip2scene_segmenter_managed`` (lifecycle node)."""
    return _run(_lifecycle_node_class(), args)


if __name__ == "__main__":
    raise SystemExit(main())
