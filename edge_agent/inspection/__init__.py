"""What runs on every frame, in the order it runs.

1. ``drivers``: the raw camera drivers (OpenCV capture of a device, file or stream; a folder of images).
2. ``frame_source``: the resilient source around them (driver calls on a ``driver_worker`` thread with
   timeouts, reconnect with backoff), rotation and the region of interest.
3. ``preprocess``: the frame as the model's input tensor.
4. ``edge_agent.engines``: the model (ONNX Runtime on the CPU, TensorRT on a GPU) -> the anomaly map at
   the model size and the per-scale maps m_s (the bundle's contract, docs/design.md section 4).
5. ``scoring``: the maps -> image score, log10 NFA map, regions and the anomalous decision.
6. ``nfa``: the a-contrario NFA itself (Numba); it imports nothing from the project. ``image_test``: the
   NFA's second family, the frame as a whole (the ``texture`` map's test).
7. ``parts`` (``[parts] mode``): ``tracking`` follows parts along the belt and ``part_verdict`` combines
   a part's frames into one decision; ``triggers`` pairs a trigger with its frame in triggered mode.
8. ``pipeline``: the stage threads (joined by ``stage_queue``) that run 1-7, each handing the next an
   immutable record (``stage_records``: ``Captured``, ``Inferred``, ``Scored``, the published ``FrameJob``),
   and hand each result to a ``Publisher`` (``edge_agent.publish``'s MQTT publisher; inspection never imports
   publish) and to the ``FrameObserver`` s (one error policy: a failing observer is logged, never fatal).
   The payloads are ``edge_agent.messages``, the contract floor beside ``bundle`` and ``config``.

Loaded once, used on every frame: ``loaded_model`` (bundle + engine + scoring) and ``selftest`` (the
bundle's self-test at load). ``overlay`` draws a result for people (preview, snapshots, segment).

Beside the frames (fed by the pipeline's observers, never in its stages): ``drift`` (the frames vs the
training images), ``shadow`` (a candidate model on a share of frames) and ``single`` (one frame through a
model outside the pipeline: ``edge-agent record --only-good``, the shadow).
"""
