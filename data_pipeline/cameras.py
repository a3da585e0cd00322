"""Pinhole cameras in the one convention used inside this project: OpenCV.

Camera frame: +x right, +y down, +z forward (the camera looks along +z).
Extrinsics are camera-to-world (c2w) 4x4 matrices: ``x_world = c2w @ x_cam``.
Intrinsics K map camera coordinates to *continuous* pixel coordinates in which the pixel
in row i, column j covers [j, j+1) x [i, i+1); its centre is (j + 0.5, i + 0.5). With this
convention a centred principal point is exactly (W/2, H/2), and resizing an image by a factor
s scales fx, fy, cx, cy all by s, with no half-pixel corrections.

Datasets in the Blender/OpenGL convention (+x right, +y up, camera looks along -z) are
converted once, at ingest, by :func:`blender_to_opencv_c2w`.
"""

from __future__ import annotations

import math

import numpy as np

# Flipping the camera's y and z axes maps OpenGL/Blender camera axes onto OpenCV ones.
_GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


class CameraError(ValueError):
    """A camera that cannot be used; the message names the offending field."""


def blender_to_opencv_c2w(c2w_blender: np.ndarray) -> np.ndarray:
    """Convert a Blender/OpenGL camera-to-world matrix into the OpenCV convention."""
    c2w = np.asarray(c2w_blender, dtype=np.float64)
    if c2w.shape != (4, 4):
        raise CameraError(f"transform_matrix must be 4x4, got shape {c2w.shape}")
    return c2w @ _GL_TO_CV


def intrinsics_from_fov(width: int, height: int, fov_x_rad: float, fov_y_rad: float | None = None) -> np.ndarray:
    """K for a centred pinhole camera with the given horizontal (and optional vertical) field of view."""
    if not (0.0 < fov_x_rad < math.pi):
        raise CameraError(f"camera_angle_x must be in (0, pi) radians, got {fov_x_rad}")
    fx = 0.5 * width / math.tan(0.5 * fov_x_rad)
    fy = fx if fov_y_rad is None else 0.5 * height / math.tan(0.5 * fov_y_rad)
    return np.array([[fx, 0.0, width / 2.0], [0.0, fy, height / 2.0], [0.0, 0.0, 1.0]])


def scale_intrinsics(K: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    """K of the same camera after resizing its image by (scale_x, scale_y)."""
    K = np.array(K, dtype=np.float64, copy=True)
    K[0, :] *= scale_x
    K[1, :] *= scale_y
    return K


def look_at_c2w(eye: np.ndarray, target: np.ndarray, up: np.ndarray = np.array([0.0, 0.0, 1.0])) -> np.ndarray:
    """OpenCV c2w of a camera at ``eye`` looking at ``target``; image 'up' (-y) is towards ``up``."""
    eye = np.asarray(eye, dtype=np.float64)
    forward = np.asarray(target, dtype=np.float64) - eye
    forward /= np.linalg.norm(forward)
    up = np.asarray(up, dtype=np.float64)
    if abs(float(np.dot(forward, up))) > 0.999:  # looking straight up or down: any other up will do
        up = np.array([0.0, 1.0, 0.0]) if abs(forward[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, eye
    return c2w


def project_points(points_world: np.ndarray, K: np.ndarray, c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project world points (N, 3) with an OpenCV camera; returns (pixels (N, 2), depth (N,))."""
    w2c = np.linalg.inv(np.asarray(c2w, dtype=np.float64))
    pts = np.asarray(points_world, dtype=np.float64)
    cam = pts @ w2c[:3, :3].T + w2c[:3, 3]
    depth = cam[:, 2]
    uvw = cam @ np.asarray(K, dtype=np.float64).T
    return uvw[:, :2] / uvw[:, 2:3], depth


def project_points_blender(points_world: np.ndarray, K: np.ndarray, c2w_blender: np.ndarray) -> np.ndarray:
    """Project world points with a Blender/OpenGL camera, written independently of the conversion.

    In the OpenGL camera frame the camera looks along -z and +y is up, so a point in front of
    the camera has z < 0, and its pixel row grows as y *decreases*.
    """
    w2c = np.linalg.inv(np.asarray(c2w_blender, dtype=np.float64))
    pts = np.asarray(points_world, dtype=np.float64)
    cam = pts @ w2c[:3, :3].T + w2c[:3, 3]
    x, y, z = cam[:, 0], cam[:, 1], cam[:, 2]
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    u = cx + fx * x / (-z)
    v = cy - fy * y / (-z)
    return np.stack([u, v], axis=1)


def check_camera(K: np.ndarray, c2w: np.ndarray, where: str, tol: float = 1e-4) -> None:
    """Raise :class:`CameraError` naming ``where`` unless K and c2w describe a valid pinhole camera."""
    K = np.asarray(K, dtype=np.float64)
    c2w = np.asarray(c2w, dtype=np.float64)
    if K.shape != (3, 3):
        raise CameraError(f"{where}.K must be 3x3, got shape {K.shape}")
    if c2w.shape != (4, 4):
        raise CameraError(f"{where}.c2w must be 4x4, got shape {c2w.shape}")
    if not (np.isfinite(K).all() and np.isfinite(c2w).all()):
        raise CameraError(f"{where}: camera contains non-finite values")
    if not (K[0, 0] > 0 and K[1, 1] > 0):
        raise CameraError(f"{where}.K: focal lengths must be positive, got fx={K[0, 0]}, fy={K[1, 1]}")
    if not (K[0, 2] > 0 and K[1, 2] > 0):
        raise CameraError(f"{where}.K: principal point must be positive, got cx={K[0, 2]}, cy={K[1, 2]}")
    if not np.allclose(K[2], [0.0, 0.0, 1.0]) or K[1, 0] != 0.0:
        raise CameraError(f"{where}.K: last row must be [0, 0, 1] and K[1, 0] must be 0")
    R = c2w[:3, :3]
    if not np.allclose(R.T @ R, np.eye(3), atol=tol):
        raise CameraError(f"{where}.c2w: rotation is not orthonormal (max |R^T R - I| = {np.abs(R.T @ R - np.eye(3)).max():.3g})")
    det = float(np.linalg.det(R))
    if abs(det - 1.0) > tol:
        raise CameraError(f"{where}.c2w: rotation determinant must be +1, got {det:.6f}")
    if not np.allclose(c2w[3], [0.0, 0.0, 0.0, 1.0]):
        raise CameraError(f"{where}.c2w: last row must be [0, 0, 0, 1]")


_K_LAST_ROW = np.array([0.0, 0.0, 1.0])
_C2W_LAST_ROW = np.array([0.0, 0.0, 0.0, 1.0])
_K_ROW_TOL = 1e-8 + 1e-5 * _K_LAST_ROW  # np.allclose's default tolerances
_C2W_ROW_TOL = 1e-8 + 1e-5 * _C2W_LAST_ROW
_EYE3 = np.eye(3)


def check_cameras(K: np.ndarray, c2w: np.ndarray, where: str, tol: float = 1e-4) -> None:
    """:func:`check_camera` for a stack of views (V, 3, 3) and (V, 4, 4), vectorised.

    The fast path checks every view at once; only when something is wrong does it fall back to
    the per-view check, for a message that names the view and the field.
    """
    K = np.asarray(K, dtype=np.float64)
    c2w = np.asarray(c2w, dtype=np.float64)
    if K.ndim == 3 and c2w.ndim == 3 and K.shape[1:] == (3, 3) and c2w.shape[1:] == (4, 4) and len(K) == len(c2w):
        # Few array operations (the reader checks every object it emits), each in check_camera's
        # order; the costly ones last, reached only by finite cameras.
        R = c2w[:, :3, :3]
        ok = (
            np.isfinite(K).all() and np.isfinite(c2w).all()
            and (K[:, (0, 1, 0, 1), (0, 1, 2, 2)] > 0).all()  # fx, fy, cx, cy
            and (np.abs(K[:, 2] - _K_LAST_ROW) <= _K_ROW_TOL).all() and not K[:, 1, 0].any()  # = np.allclose
            and (np.abs(c2w[:, 3] - _C2W_LAST_ROW) <= _C2W_ROW_TOL).all()
            and np.abs(np.matmul(R.transpose(0, 2, 1), R) - _EYE3).max(initial=0.0) <= tol
            and (np.abs(np.linalg.det(R) - 1.0) <= tol).all()
        )
        if ok:
            return
    for i in range(max(len(K), len(c2w))):
        check_camera(K[i], c2w[i], where=f"{where}[{i}]", tol=tol)
    raise CameraError(f"{where}: intrinsics and extrinsics must be stacks of 3x3 and 4x4 of equal length, "
                      f"got {K.shape} and {c2w.shape}")


# -- cameras circling the object (turntables, previews, image-to-3D targets) ----------------------
def orbit_camera(radius: float, elevation_deg: float, azimuth_deg: float, fov_deg: float,
                 resolution: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(K (3, 3), c2w (4, 4)) float64 of a camera on the sphere of ``radius`` around the origin,
    looking at it with world +z up: azimuth counter-clockwise seen from +z, starting on +x;
    ``elevation_deg`` above the xy plane; ``fov_deg`` horizontal; ``resolution`` an int (square)
    or (height, width)."""
    if radius <= 0:
        raise CameraError(f"orbit radius must be positive, got {radius}")
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    elevation, azimuth = math.radians(elevation_deg), math.radians(azimuth_deg)
    eye = radius * np.array([math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth),
                             math.sin(elevation)])
    return intrinsics_from_fov(width, height, math.radians(fov_deg)), look_at_c2w(eye, np.zeros(3))


def turntable_cameras(num_frames: int, radius: float, elevation_deg: float, fov_deg: float,
                      resolution: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """K (N, 3, 3) and c2w (N, 4, 4), float32: :func:`orbit_camera` at azimuths 360 * i / N degrees,
    so the last frame leads back into the first and a looping GIF repeats no frame."""
    if num_frames <= 0:
        raise CameraError(f"num_frames must be positive, got {num_frames}")
    cameras = [orbit_camera(radius, elevation_deg, 360.0 * i / num_frames, fov_deg, resolution)
               for i in range(num_frames)]
    return (np.stack([K for K, _ in cameras]).astype(np.float32),
            np.stack([c2w for _, c2w in cameras]).astype(np.float32))
