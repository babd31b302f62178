//! Inputs that start and end containers: cgroup records from eBPF, answers of the tasks
//! that asked a runtime, and the resync with what already runs.

use super::*;

impl Daemon {
    /// An answer from a task that asked a runtime.
    pub(super) fn on_answer(&mut self, a: Answer) -> anyhow::Result<()> {
        match a {
            Answer::Meta { id, meta } => self.release(&id, Some(meta)),
            Answer::Layer { id, result } => {
                // Gone meanwhile (its cgroup was removed): nothing to arm.
                let Some(ask) = self.asking.remove(&id) else {
                    return Ok(());
                };
                let outcome = match result {
                    Ok(Some((engine, layer, meta))) => {
                        let found = Found {
                            layer,
                            runtime: RuntimeName::Docker,
                            engine: Some(engine),
                            meta: Some(meta),
                            resolved: None,
                        };
                        let r = self.add_to_watcher(&ask.cgroup.id, &found, ask.since);
                        if let (Ok(_), Some(dir)) = (&r, ask.unified_cgroup.as_deref()) {
                            self.watch_exit(&id, dir);
                        }
                        self.finish_arm(
                            &ask.cgroup,
                            found,
                            r,
                            None,
                            ask.unified_cgroup.as_deref(),
                            ask.since,
                        )?
                    }
                    Ok(None) => ArmOutcome::Foreign,
                    Err(cause) => ArmOutcome::Failed {
                        cause,
                        exhausted: false,
                    },
                };
                self.settle(&ask.cgroup, ask.unified_cgroup, ask.since, outcome)
            }
            Answer::Running { ids } => {
                for id in ids {
                    self.arm_running_docker(&id);
                }
                Ok(())
            }
            Answer::Frozen { id, result } => self.arm_frozen(&id, result),
        }
    }

    /// Handles a cgroup record; true while an engine is being asked about its container.
    pub(super) fn on_lifecycle(&mut self, rec: LifecycleRecord) -> anyhow::Result<bool> {
        tracing::debug!(
            op = ?rec.op,
            hierarchy_id = rec.hierarchy_id,
            cgroup_id = rec.cgroup_id,
            path = %rec.path,
            age_us = monotonic_ns().saturating_sub(rec.ktime_ns) / 1000,
            "lifecycle record"
        );
        let rec_path = rec.path.clone();
        let Some(cg) = parse_container_cgroup(&rec.path) else {
            return Ok(false);
        };
        let Some(hierarchy) = self.mounts.hierarchy_of(rec.hierarchy_id) else {
            return Ok(false);
        };
        match rec.op {
            CgroupOp::Mkdir => {
                let id = cg.id.as_str();
                if self.containers.contains_key(id)
                    || self.foreign.contains(id)
                    || self.excluded.contains(id)
                    || self.unarmed.contains_key(id)
                    || self.asking.contains_key(id)
                    || self.freezing.contains_key(id)
                {
                    return Ok(false);
                }
                // A cgroup v1 engine on a hybrid host: runc makes the container's v2 cgroup
                // last, right before init joins it. Wait for that one and freeze there:
                // runc of a v1 engine never reads the v2 freeze state, so that freeze can
                // never fail a start, however late it lands (ARCHITECTURE.md).
                if hierarchy == Hierarchy::Freezer && self.unified_parent_exists(&rec.path) {
                    self.pending
                        .entry(id.to_owned())
                        .or_insert_with(|| (rec.ktime_ns, cg.clone(), rec.path.clone()));
                    return Ok(false);
                }
                let first_ns = self.pending.remove(id).map(|(t, _, _)| t);
                let v1_engine = first_ns.is_some();
                let since = wall_clock_of(first_ns.unwrap_or(rec.ktime_ns));
                let age = Duration::from_nanos(monotonic_ns().saturating_sub(rec.ktime_ns));
                let target = self
                    .mounts
                    .dir(hierarchy, &rec.path)
                    .map(|dir| FreezeTarget {
                        dir,
                        kind: match hierarchy {
                            Hierarchy::Freezer => FreezerKind::V1,
                            Hierarchy::Unified => FreezerKind::V2,
                        },
                    });
                // Otherwise runc reads this very freezer right after it attaches the
                // container's init, and a freeze held across that read fails the start
                // ("timeout of 10s reached waiting for the cgroup to freeze"). On cgroup v2
                // our write queues behind that attach on the cgroup lock and lands in exactly
                // that window (seen: 2 failed starts in ~300), so a v2-only container is
                // armed without freezing: arming takes ~0.3 ms, its first instruction comes
                // tens of ms later. A v1 freezer (pure v1 host) is frozen only while the
                // record is fresh, before runc gets there.
                let safe = v1_engine
                    || (hierarchy == Hierarchy::Freezer && age <= self.config.freeze_max_age);
                let freeze = if self.config.freeze && safe {
                    target
                } else {
                    None
                };
                if self.config.freeze && freeze.is_none() && hierarchy == Hierarchy::Freezer {
                    tracing::info!(container_id = %cg.id, age_us = age.as_micros() as u64, "lifecycle record too old to freeze safely; arming without freezing");
                }
                self.arm(
                    &cg,
                    freeze,
                    self.mounts
                        .dir(Hierarchy::Unified, &rec.path)
                        .filter(|_| hierarchy == Hierarchy::Unified),
                    Some(since),
                )?;
            }
            CgroupOp::Rmdir => {
                let id = cg.id.as_str();
                self.asking.remove(id);
                self.freezing.remove(id);
                if self.containers.contains_key(id) {
                    // Events queued before the container's cgroup went away are its own:
                    // print them before its watches are dropped.
                    self.drain_watcher()?;
                    tracing::debug!(container_id = %cg.id, hierarchy_id = rec.hierarchy_id, "stopped by rmdir");
                    self.stop(id)?;
                }
                self.foreign.remove(id);
                self.excluded.remove(id);
                self.pending.remove(id);
                self.unarmed.remove(id);
            }
        }
        Ok(parse_container_cgroup(&rec_path).is_some_and(|cg| {
            self.asking.contains_key(cg.id.as_str()) || self.freezing.contains_key(cg.id.as_str())
        }))
    }

    /// The v2 cgroup of a container found by listing (not by its mkdir): Docker's cgroupfs
    /// and systemd driver names.
    pub(super) fn unified_cgroup_of(&self, id: &str) -> Option<PathBuf> {
        [
            format!("/docker/{id}"),
            format!("/system.slice/docker-{id}.scope"),
        ]
        .iter()
        .filter_map(|rel| self.mounts.dir(Hierarchy::Unified, rel))
        .find(|d| d.is_dir())
    }

    /// Whether the v2 hierarchy has the parent of cgroup `rel` (the engine puts its
    /// containers' v2 cgroups there too, so one is coming).
    pub(super) fn unified_parent_exists(&self, rel: &str) -> bool {
        let parent = rel
            .trim_end_matches('/')
            .rsplit_once('/')
            .map_or("", |(p, _)| p);
        !parent.is_empty()
            && self
                .mounts
                .dir(Hierarchy::Unified, parent)
                .is_some_and(|d| d.is_dir())
    }

    /// Arms, without freezing, containers whose v2 cgroup never came (a runtime that does
    /// not use the v2 hierarchy after all).
    pub(super) fn arm_stale_pending(&mut self) {
        let now = monotonic_ns();
        let stale: Vec<(String, u64, ContainerCgroup, String)> = self
            .pending
            .iter()
            .filter(|(_, (t, _, _))| now.saturating_sub(*t) > 500_000_000)
            .map(|(id, (t, cg, rel))| (id.clone(), *t, cg.clone(), rel.clone()))
            .collect();
        for (id, first_ns, cg, rel) in stale {
            self.pending.remove(&id);
            tracing::warn!(container_id = %id, "no cgroup v2 directory came for this container; armed without freezing");
            let cgroup = self
                .mounts
                .dir(Hierarchy::Unified, &rel)
                .filter(|d| d.is_dir())
                .or_else(|| self.unified_cgroup_of(&id));
            let since = Some(wall_clock_of(first_ns));
            if let Err(e) = self.arm(&cg, None, cgroup, since) {
                tracing::error!(container_id = %id, error = %e, "cannot arm");
            }
            if self.containers.contains_key(&id) {
                self.stats.late_arm();
            }
        }
    }

    /// Arms the running containers of every runtime but Docker (whose engines list theirs
    /// with names): found by walking the cgroup hierarchy, resolved from disk.
    pub(super) fn resync_on_disk(&mut self) {
        let (hierarchy, root) = match (&self.mounts.unified, &self.mounts.freezer) {
            (Some(u), _) => (Hierarchy::Unified, u.clone()),
            (None, Some(f)) => (Hierarchy::Freezer, f.clone()),
            (None, None) => return,
        };
        for (rel, cg) in find_container_cgroups(&root, 8) {
            let id = cg.id.as_str();
            if cg.runtime.runtime() == RuntimeName::Docker
                || self.containers.contains_key(id)
                || self.foreign.contains(id)
                || self.excluded.contains(id)
                || self.unarmed.contains_key(id)
                || self.asking.contains_key(id)
                || self.freezing.contains_key(id)
            {
                continue;
            }
            let cgroup = self
                .mounts
                .dir(Hierarchy::Unified, &rel)
                .filter(|d| hierarchy == Hierarchy::Unified || d.is_dir());
            if let Err(e) = self.arm(&cg, None, cgroup, None) {
                tracing::error!(container_id = %id, error = %e, "cannot arm a running container");
            }
        }
    }

    /// Arms the running containers the Docker engines list (at start-up, before `ready`).
    pub(super) async fn resync_docker(&mut self) {
        for engine in 0..self.runtime.len() {
            for id in self.runtime.running(engine).await {
                self.arm_running_docker(&id);
            }
        }
    }

    /// Asks every Docker engine for its running containers, by tasks (after lifecycle
    /// records were lost); they are armed when the answers come.
    pub(super) fn ask_running(&self) {
        for engine in 0..self.runtime.len() {
            let (runtime, answers) = (self.runtime.clone(), self.answers.clone());
            tokio::spawn(async move {
                let ids = runtime.running(engine).await;
                let _ = answers.send(Answer::Running { ids });
            });
        }
    }

    /// Arms a container a Docker engine says is running, unless it already is.
    pub(super) fn arm_running_docker(&mut self, id: &str) {
        if self.containers.contains_key(id)
            || self.asking.contains_key(id)
            || self.freezing.contains_key(id)
            || self.excluded.contains(id)
        {
            return;
        }
        let Some(cid) = ContainerId::parse(id) else {
            return;
        };
        // Already running: what is in its layer predates fsmon (since: None).
        let cgroup = self.unified_cgroup_of(id);
        let cg = ContainerCgroup {
            id: cid,
            runtime: RuntimeKind::DockerCgroupfs,
            namespace: None,
        };
        if let Err(e) = self.arm(&cg, None, cgroup, None) {
            tracing::error!(container_id = %id, error = %e, "cannot arm a running container");
        }
    }
}
