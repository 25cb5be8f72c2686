"""The teacher RPC, both sides of it.

    v1/          generated from ``protos/vidalign/teacher`` (``make protos``;
                 ``tests/unit/test_protos.py`` fails when the committed code is stale)
    wire         tensors on the wire: name, dtype, shape, raw little-endian bytes, in pieces
    protocol     the requests and replies as Python values, and their messages
    client       ``connect(address)``: a teacher in this process or over gRPC, and
                 ``RemoteDenoisingLoss``, the teacher's loss as a differentiable module
    denoising    the engine that answers ``DenoisingLoss`` (VDA's diffusion teacher)
    priors       the engine that answers ``AttentionPriors`` (MotionEnhancer's CogVideoX)

The models themselves live with their methods: ``vidalign.vda`` (the diffusion
teacher, its adapter and loss) and ``vidalign.motionenhancer`` (CogVideoX, DDIM
inversion, attention capture, MHS, MTTI, alignment). The service that hosts the
engines is ``vidalign_teacher``. Nothing is imported here, so the generated
stubs load without torch.
"""
