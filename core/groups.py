"""Groups (radiology sites): who may see which studies.

Each user belongs to at most one group and each study to its uploader's group (a re-run to its
original's). Users without a group and studies without one form the *default group*. A user sees
the studies of their own group, and with them those studies' images, predictions, heat maps,
exports, reports and review cases; a user whose role grants ``all_groups`` (admins) sees every
group's. Every query for studies or cases goes through :func:`study_condition`, and every object
fetched by id through :func:`may_see`, so another group's study is indistinguishable from a
missing one (the portal answers 404).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Group, Study, User

MAX_GROUP_NAME = 80


class GroupError(ValueError):
    """A bad or taken group name, or an unknown group; the message says which."""


def study_condition(all_groups: bool, group_id: int | None) -> Any:
    """A SQL condition on :class:`Study` for what a user sees (None: no restriction)."""
    if all_groups:
        return None
    return Study.group_id.is_(None) if group_id is None else Study.group_id == group_id


def may_see(study: Study | None, all_groups: bool, group_id: int | None) -> bool:
    """Whether a user of ``group_id`` (or of every group) may see ``study``."""
    return study is not None and (all_groups or study.group_id == group_id)


def group_of_user(session: Session, user_id: int | None) -> int | None:
    """The group of user ``user_id`` (None: the default group, or no such user)."""
    if user_id is None:
        return None
    return session.scalar(select(User.group_id).where(User.id == user_id))


def list_groups(session: Session) -> list[Group]:
    """Every group, by name."""
    return list(session.scalars(select(Group).order_by(Group.name)))


def create_group(session: Session, name: str) -> Group:
    """Create a group.

    Raises:
        GroupError: on an empty, too long or taken name.
    """
    name = " ".join(name.split())
    if not name or len(name) > MAX_GROUP_NAME:
        raise GroupError(f"group name must be 1-{MAX_GROUP_NAME} characters")
    if session.scalar(select(Group.id).where(Group.name == name)) is not None:
        raise GroupError(f"group {name!r} already exists")
    group = Group(name=name)
    session.add(group)
    session.flush()
    return group


def set_group(session: Session, user: User, group_id: int | None) -> Group | None:
    """Move ``user`` into group ``group_id`` (None: the default group); returns the group.

    The user's studies stay in the group they were uploaded in.

    Raises:
        GroupError: for an unknown group.
    """
    group = session.get(Group, group_id) if group_id is not None else None
    if group_id is not None and group is None:
        raise GroupError(f"group #{group_id} not found")
    user.group_id = group_id
    return group
