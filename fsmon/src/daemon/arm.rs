//! Arming a container: the filters' early decision, freeze, on-disk lookup, watch, thaw,
//! exit watch, gate settle, `container_start` (or its hold), and what happens when it
//! cannot be armed (asked of an engine, retried, `arm_failed`).

use super::*;

impl Daemon {
    /// Freeze (optionally) → resolve upperdir → arm → thaw → `container_start`. A
    /// container that cannot be armed for lack of resources (descriptors, an engine that
    /// cannot answer) is never dropped silently: see [`Self::arm_failed`].
    pub(super) fn arm(
        &mut self,
        cg: &ContainerCgroup,
        freeze: Option<FreezeTarget>,
        unified_cgroup: Option<PathBuf>,
        since: Option<SystemTime>,
    ) -> anyhow::Result<()> {
        if let Some(target) = freeze {
            if self.decide_early(cg) == Decision::Skip {
                return self.settle(cg, unified_cgroup, since, ArmOutcome::Excluded);
            }
            self.freeze_off_loop(cg, target, unified_cgroup, since);
            return Ok(());
        }
        let outcome = self.try_arm(cg, unified_cgroup.as_deref(), since)?;
        self.settle_with_retry(cg, unified_cgroup, since, outcome)
    }

    /// After an attempt: when descriptors ran out, the cache of directory fds gives way
    /// and the container gets a second try (not frozen); then the outcome is booked.
    pub(super) fn settle_with_retry(
        &mut self,
        cg: &ContainerCgroup,
        unified_cgroup: Option<PathBuf>,
        since: Option<SystemTime>,
        mut outcome: ArmOutcome,
    ) -> anyhow::Result<()> {
        if let ArmOutcome::Failed {
            exhausted: true, ..
        } = outcome
        {
            self.relieve_fds();
            outcome = self.try_arm(cg, unified_cgroup.as_deref(), since)?;
        }
        self.settle(cg, unified_cgroup, since, outcome)
    }

    /// Writes a freeze by a blocking task: the write can wait 5–17 ms behind runc on the
    /// cgroup lock, and the loop goes on meanwhile (other containers, file events). The
    /// container is armed when [`Answer::Frozen`] comes back (`arm_frozen`); a hold whose
    /// container went meanwhile is released when dropped.
    fn freeze_off_loop(
        &mut self,
        cg: &ContainerCgroup,
        target: FreezeTarget,
        unified_cgroup: Option<PathBuf>,
        since: Option<SystemTime>,
    ) {
        let id = cg.id.as_str().to_owned();
        self.freezing.insert(
            id.clone(),
            Asking {
                cgroup: cg.clone(),
                unified_cgroup,
                since,
            },
        );
        let (freezer, answers) = (self.freezer.clone(), self.answers.clone());
        let bound = self.config.freeze_timeout;
        tokio::task::spawn_blocking(move || {
            let result = freezer.freeze(&target, bound);
            // A closed channel (shutdown) drops the answer, and with it the hold: thawed.
            let _ = answers.send(Answer::Frozen { id, result });
        });
    }

    /// The freeze written off the loop came back: arm the (frozen) container.
    pub(super) fn arm_frozen(
        &mut self,
        id: &str,
        result: Result<Option<Hold>, FreezeError>,
    ) -> anyhow::Result<()> {
        // Gone meanwhile (its cgroup was removed): the hold, if any, is dropped: released.
        let Some(ask) = self.freezing.remove(id) else {
            return Ok(());
        };
        let frozen = match result {
            Ok(f) => f,
            Err(e) if crate::limits::chain_is_fd_exhaustion(&e) => {
                let outcome = ArmOutcome::Failed {
                    cause: format!("{e:#}"),
                    exhausted: true,
                };
                return self.settle_with_retry(&ask.cgroup, ask.unified_cgroup, ask.since, outcome);
            }
            Err(e) => {
                tracing::warn!(container_id = %id, error = %e, "cannot freeze; arming without it");
                None
            }
        };
        let outcome = self.arm_held(
            &ask.cgroup,
            frozen,
            ask.unified_cgroup.as_deref(),
            ask.since,
        )?;
        self.settle_with_retry(&ask.cgroup, ask.unified_cgroup, ask.since, outcome)
    }

    /// Books how an attempt to arm ended. Unless it was armed (the gate ended then) or an
    /// answer is awaited, the exec gate holds nothing of it any more: a container fsmon
    /// does not arm now must not wait for the gate's bound.
    pub(super) fn settle(
        &mut self,
        cg: &ContainerCgroup,
        unified_cgroup: Option<PathBuf>,
        since: Option<SystemTime>,
        outcome: ArmOutcome,
    ) -> anyhow::Result<()> {
        let id = cg.id.as_str();
        if !matches!(outcome, ArmOutcome::Armed | ArmOutcome::Asking) {
            self.settle_gate(unified_cgroup.as_deref());
        }
        match outcome {
            ArmOutcome::Armed | ArmOutcome::Gone => {
                self.unarmed.remove(id);
            }
            // Stays in `unarmed` if it was there: the answer settles it.
            ArmOutcome::Asking => {}
            ArmOutcome::Foreign => {
                tracing::debug!(container_id = %id, "no runtime knows this container; ignored");
                self.unarmed.remove(id);
                self.foreign.insert(id.to_owned());
            }
            ArmOutcome::Excluded => {
                tracing::debug!(container_id = %id, "excluded by the filters; not armed");
                self.unarmed.remove(id);
                self.excluded.insert(id.to_owned());
            }
            ArmOutcome::Failed { cause, exhausted } => {
                self.arm_failed(cg, unified_cgroup, since, &cause, exhausted)?;
            }
        }
        Ok(())
    }

    /// A container could not be armed: an `overflow` record names it (`arm_failed`,
    /// once), the log says why and what to raise, and the tick retries it; once armed,
    /// what its layer got meanwhile is reported by scan (it is armed with the instant its
    /// cgroup appeared, or fsmon's start for one that was already running).
    pub(super) fn arm_failed(
        &mut self,
        cg: &ContainerCgroup,
        unified_cgroup: Option<PathBuf>,
        since: Option<SystemTime>,
        cause: &str,
        exhausted: bool,
    ) -> anyhow::Result<()> {
        let id = cg.id.as_str();
        let since = since.unwrap_or(self.started);
        if let Some(u) = self.unarmed.get_mut(id) {
            u.attempts += 1;
            return Ok(());
        }
        if exhausted {
            tracing::error!(container_id = %id, cause, advice = %crate::limits::fd_advice(), "cannot arm the container; retrying every second");
        } else {
            tracing::error!(container_id = %id, cause, "cannot arm the container; retrying every second");
        }
        let meta = self.runtime.cached_meta(id);
        let cref = ContainerRef {
            id: id.to_owned(),
            name: meta.name,
            image: meta.image,
            runtime: cg.runtime.runtime(),
            pod: None,
        };
        let line = record::overflow(SystemTime::now(), Some(&cref), "arm_failed");
        self.emit(&line)?;
        self.unarmed.insert(
            id.to_owned(),
            Unarmed {
                cgroup: cg.clone(),
                unified_cgroup,
                since,
                attempts: 1,
            },
        );
        Ok(())
    }

    /// Descriptors ran out: the watcher's cache is resized to what the limit leaves now
    /// (it may have been lowered, or other parts of the daemon hold more), shedding fds.
    pub(super) fn relieve_fds(&mut self) {
        let (cached, _) = self.watcher.fd_budget();
        let others = crate::limits::open_fd_count().saturating_sub(cached);
        let budget = FdBudget::size_for(crate::limits::soft_fd_limit(), others);
        let (_, was) = self.watcher.fd_budget();
        if budget < was {
            tracing::warn!(
                cached,
                others,
                budget,
                was,
                "out of file descriptors; shrinking the directory fd cache"
            );
        }
        self.watcher.set_fd_budget(budget.min(was));
    }

    /// After [`Self::relieve_fds`]: grows the cache back (up to its start-up size) when the
    /// limit allows again.
    pub(super) fn regrow_fds(&mut self) {
        let (cached, now) = self.watcher.fd_budget();
        if now >= self.fd_budget_max {
            return;
        }
        let others = crate::limits::open_fd_count().saturating_sub(cached);
        let budget =
            FdBudget::size_for(crate::limits::soft_fd_limit(), others).min(self.fd_budget_max);
        if budget > now {
            tracing::info!(
                budget,
                was = now,
                "descriptors available again; growing the directory fd cache"
            );
            self.watcher.set_fd_budget(budget);
        }
    }

    /// Retries the containers that could not be armed (on the tick). Not frozen: they
    /// run already; what they did meanwhile is reported by scan.
    pub(super) fn retry_unarmed(&mut self) {
        let ids: Vec<String> = self
            .unarmed
            .keys()
            .filter(|id| !self.asking.contains_key(*id) && !self.freezing.contains_key(*id))
            .cloned()
            .collect();
        for id in ids {
            let Some(u) = self.unarmed.get(&id) else {
                continue;
            };
            let (cg, cgroup, since, attempts) = (
                u.cgroup.clone(),
                u.unified_cgroup.clone(),
                u.since,
                u.attempts,
            );
            if let Err(e) = self.arm(&cg, None, cgroup, Some(since)) {
                tracing::error!(container_id = %id, error = %e, "cannot arm");
            }
            if self.containers.contains_key(&id) {
                self.stats.late_arm();
            }
            if !self.unarmed.contains_key(&id) {
                tracing::info!(container_id = %id, attempts, "armed a container that could not be armed before");
            }
        }
    }

    /// The filters' decision before anything is frozen or watched, from what is known at
    /// the cgroup's appearance: the id and the runtime (from the cgroup's name), a Docker
    /// container's name and image when its engine already told them (its `create` event),
    /// and another runtime's identity (name, image, Kubernetes pod) from its bundle's
    /// annotations and its own small metadata files. Those files are read here only when a
    /// filter needs them, so that an excluded container is never frozen. `NotYet`: decided
    /// again once its identity is known (`finish_arm`, `release`).
    pub(super) fn decide_early(&self, cg: &ContainerCgroup) -> Decision {
        let filter = &self.config.containers;
        if filter.is_empty() {
            return Decision::Monitor;
        }
        let id = cg.id.as_str();
        let runtime = cg.runtime.runtime();
        let mut facts = Facts {
            id,
            runtime: Some(runtime.as_str()),
            meta: None,
        };
        let decision = filter.decide(&facts);
        if decision != Decision::NotYet {
            return decision;
        }
        if runtime == RuntimeName::Docker {
            let cached = self.runtime.cached_meta(id);
            if cached.name.is_none() && cached.image.is_none() {
                return Decision::NotYet;
            }
            facts.meta = Some(Meta {
                name: cached.name.as_deref(),
                image: cached.image.as_deref(),
                ..Meta::default()
            });
            return filter.decide(&facts);
        }
        let rt = AnyRuntime::for_kind(&self.config.places, cg.runtime);
        let bundle = rt
            .bundle_dirs(cg)
            .iter()
            .find_map(|d| oci::read_bundle(d).ok());
        let ident = rt.identity(&cg.id, bundle.as_ref());
        if bundle.is_none() && ident.name.is_none() && ident.image.is_none() {
            return Decision::NotYet;
        }
        let pod = ident.pod.as_ref();
        facts.meta = Some(Meta {
            name: ident.name.as_deref(),
            image: ident.image.as_deref(),
            labels: None,
            namespace: pod.and_then(|p| p.namespace.as_deref()),
            pod: pod.and_then(|p| p.name.as_deref()),
        });
        filter.decide(&facts)
    }

    /// An attempt to arm a container without freezing it.
    pub(super) fn try_arm(
        &mut self,
        cg: &ContainerCgroup,
        unified_cgroup: Option<&std::path::Path>,
        since: Option<SystemTime>,
    ) -> anyhow::Result<ArmOutcome> {
        if self.decide_early(cg) == Decision::Skip {
            return Ok(ArmOutcome::Excluded);
        }
        self.arm_held(cg, None, unified_cgroup, since)
    }

    /// Resolve → watch → exit watch → thaw `frozen` → `container_start` (or its hold).
    fn arm_held(
        &mut self,
        cg: &ContainerCgroup,
        frozen: Option<Hold>,
        unified_cgroup: Option<&std::path::Path>,
        since: Option<SystemTime>,
    ) -> anyhow::Result<ArmOutcome> {
        let id = cg.id.as_str();
        let located = self.locate(cg);
        let added = match &located {
            Ok(Located::Found(found)) => Some(self.add_to_watcher(&cg.id, found, since)),
            _ => None,
        };
        // The container's exit, in order with its file events, so that nothing the engine
        // does afterwards (removing a --rm container's layer) is reported as its doing.
        // Watched before the container is thawed or resumed: one that ran and exited before
        // its watch existed would only be seen by the rmdir record, after the clean-up.
        // Without a v2 cgroup, the cgroup's rmdir record ends monitoring instead.
        if let (Some(Ok(_)), Some(dir)) = (&added, unified_cgroup) {
            self.watch_exit(id, dir);
        }
        let freeze_us = match frozen.map(|f| self.freezer.thaw(f)) {
            Some(Ok(rep)) => {
                if rep.bound_exceeded {
                    tracing::warn!(container_id = %id, held_us = rep.held.as_micros() as u64, "arming took longer than --freeze-timeout; the watchdog thawed the container");
                }
                Some(rep.held.as_micros() as u64)
            }
            Some(Err(e)) => {
                tracing::error!(container_id = %id, error = %e, "thaw failed");
                None
            }
            None => None,
        };
        match (located, added) {
            (Ok(Located::Found(found)), Some(r)) => {
                self.finish_arm(cg, *found, r, freeze_us, unified_cgroup, since)
            }
            (Ok(Located::Ask), _) => {
                self.ask_layer(cg, unified_cgroup, since);
                Ok(ArmOutcome::Asking)
            }
            (Ok(_), _) => Ok(ArmOutcome::Foreign),
            (Err((cause, exhausted)), _) => Ok(ArmOutcome::Failed { cause, exhausted }),
        }
    }

    /// Arms the recursive watch on a found layer (reporting by scan what it got since
    /// `since`: a container armed after it started running has those changes reported,
    /// not silently indexed).
    pub(super) fn add_to_watcher(
        &mut self,
        id: &ContainerId,
        found: &Found,
        since: Option<SystemTime>,
    ) -> Result<ArmStats, WatchError> {
        let layer = found.layer.clone();
        match since {
            Some(t) => self.watcher.add_container_since(id.as_str(), layer, t),
            None => self.watcher.add_container(id.as_str(), layer),
        }
    }

    /// After the watch is armed (and the cgroup thawed): `container_start`, or its hold
    /// while the container's name and image are asked for, and the exit watch.
    pub(super) fn finish_arm(
        &mut self,
        cg: &ContainerCgroup,
        found: Found,
        added: Result<ArmStats, WatchError>,
        freeze_us: Option<u64>,
        unified_cgroup: Option<&std::path::Path>,
        since: Option<SystemTime>,
    ) -> anyhow::Result<ArmOutcome> {
        let id = cg.id.as_str();
        let upperdir = found.layer.upperdir.clone();
        if let Err(e) = added {
            self.watcher.remove_container(id);
            if crate::limits::chain_is_fd_exhaustion(&e) {
                return Ok(ArmOutcome::Failed {
                    cause: format!("{e:#}"),
                    exhausted: true,
                });
            }
            tracing::error!(container_id = %id, upperdir = %upperdir.display(), error = %e, "cannot watch the container's upperdir");
            return Ok(ArmOutcome::Gone);
        }
        // Armed: the gate ends here, not after the engine has answered for the name and
        // image (that may take a while on a busy engine, and an armed container's exec is
        // never to be held).
        let gated_us = self.settle_gate(unified_cgroup);
        let (cref, setup, ask) = self.identify(&cg.id, cg.runtime, found);
        // Its name and image are known unless an engine is being asked for them (then
        // `release` decides, before its `container_start`).
        if ask.is_none() && self.config.containers.decide(&facts_of(&cref)) == Decision::Skip {
            self.watcher.remove_container(id);
            return Ok(ArmOutcome::Excluded);
        }
        // How long after its cgroup appeared the container was armed (null for one that
        // was running before fsmon started).
        let now = SystemTime::now();
        let arm_us = since
            .and_then(|t| now.duration_since(t).ok())
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let held = match ask {
            Some(engine) => {
                self.ask_meta(engine, id);
                Some(HeldStart {
                    at: now,
                    upperdir,
                    freeze_us,
                    arm_us,
                    gated_us,
                    outputs: Vec::new(),
                })
            }
            None => {
                let line =
                    record::container_start(now, &cref, &upperdir, freeze_us, arm_us, gated_us);
                self.emit(&line)?;
                None
            }
        };
        let encoded = cref.encoded();
        self.containers.insert(
            id.to_owned(),
            Monitored {
                cref,
                encoded,
                setup,
                held,
            },
        );
        // Arming can itself produce output (a watch-limit overflow) that no fd readiness
        // will announce: print it now.
        self.drain_watcher()?;
        Ok(ArmOutcome::Armed)
    }

    /// Watches the container's exit (its v2 `cgroup.events`), in order with its file
    /// events, so that nothing the engine does afterwards (removing a --rm container's
    /// layer) is reported as its doing. Done before the container is thawed or resumed:
    /// one that ran and exited before its watch existed would only be seen by the rmdir
    /// record, after the clean-up. Without a v2 cgroup, the rmdir record ends monitoring.
    pub(super) fn watch_exit(&mut self, id: &str, dir: &std::path::Path) {
        if let Err(e) = self.watcher.watch_exit(id, dir) {
            tracing::debug!(container_id = %id, cgroup = %dir.display(), error = %e, "cannot watch the container's cgroup.events");
        }
    }

    /// Asks the Docker engines for the layer of a container not found on disk, by a task.
    pub(super) fn ask_layer(
        &mut self,
        cg: &ContainerCgroup,
        unified_cgroup: Option<&std::path::Path>,
        since: Option<SystemTime>,
    ) {
        let id = cg.id.as_str().to_owned();
        if self.asking.contains_key(&id) {
            return;
        }
        tracing::debug!(container_id = %id, "not found on disk; asking the engines");
        self.asking.insert(
            id.clone(),
            Asking {
                cgroup: cg.clone(),
                unified_cgroup: unified_cgroup.map(PathBuf::from),
                since,
            },
        );
        let (runtime, answers) = (self.runtime.clone(), self.answers.clone());
        tokio::spawn(async move {
            let result = runtime.layer_by_inspect(&id).await;
            let _ = answers.send(Answer::Layer { id, result });
        });
    }

    /// Asks an engine for the name and image of an armed container, by a task (bounded
    /// by [`META_TIMEOUT`]); its records are held until the answer.
    pub(super) fn ask_meta(&self, engine: Option<usize>, id: &str) {
        let (runtime, answers, id) = (self.runtime.clone(), self.answers.clone(), id.to_owned());
        tokio::spawn(async move {
            let meta = runtime.meta_by_inspect(engine, &id, META_TIMEOUT).await;
            let _ = answers.send(Answer::Meta { id, meta });
        });
    }

    /// Finds a container's layers on disk, without the network: Docker's overlay2
    /// metadata, then any runtime's bundle and rootfs mount. `Located::Ask`: a Docker
    /// container that only an engine's inspect API can place. `Err`: (cause, whether
    /// descriptors ran out).
    fn locate(&self, cg: &ContainerCgroup) -> Result<Located, (String, bool)> {
        let id = cg.id.as_str();
        let docker = cg.runtime.runtime() == RuntimeName::Docker;
        if docker {
            match self.runtime.layer_on_disk(id) {
                Ok(Some((engine, layer))) => {
                    return Ok(Located::Found(Box::new(Found {
                        layer,
                        runtime: RuntimeName::Docker,
                        engine: Some(engine),
                        meta: None,
                        resolved: None,
                    })))
                }
                Ok(None) => {}
                Err(e) => return Err((format!("reading the engine's layer metadata: {e}"), true)),
            }
        }
        match AnyRuntime::for_kind(&self.config.places, cg.runtime).resolve(cg) {
            Ok(r) => {
                let ident = r
                    .bundle
                    .as_ref()
                    .map(|b| oci::identity_from_annotations(&b.annotations));
                if ident.is_some_and(|i| i.sandbox) {
                    tracing::debug!(container_id = %id, "Kubernetes sandbox (pause) container; not monitored");
                    return Ok(Located::NotMonitored);
                }
                tracing::debug!(container_id = %id, runtime = r.runtime.as_str(), how = r.how.as_str(), upperdir = %r.layer.upperdir.display(), "resolved on disk");
                Ok(Located::Found(Box::new(Found {
                    layer: r.layer.clone(),
                    runtime: r.runtime,
                    engine: None,
                    meta: None,
                    resolved: Some(r),
                })))
            }
            Err(_) if docker => Ok(Located::Ask),
            Err(e) => {
                tracing::debug!(container_id = %id, runtime = cg.runtime.runtime().as_str(), error = %e, "not found on disk; ignored");
                Ok(Located::NotMonitored)
            }
        }
    }

    /// Who an armed container is, without asking an engine, and the paths its runtime
    /// creates while setting it up. The third value is `Some(engine)` when the Docker
    /// engines are to be asked for the name and image (not on disk: not yet connected to
    /// the engine, or its files are elsewhere).
    fn identify(
        &self,
        id: &ContainerId,
        kind: RuntimeKind,
        found: Found,
    ) -> (ContainerRef, SetupPaths, Option<Option<usize>>) {
        let setup = found
            .resolved
            .as_ref()
            .map(Resolved::setup_paths)
            .unwrap_or_default();
        let mut ask = None;
        let (name, image, pod) = if found.runtime == RuntimeName::Docker {
            let meta = match found.meta {
                Some(m) => m,
                None => match self.runtime.meta_on_disk(found.engine, id.as_str()) {
                    Some(m) => m,
                    None => {
                        ask = Some(found.engine);
                        self.runtime.cached_meta(id.as_str())
                    }
                },
            };
            (meta.name, meta.image, None)
        } else {
            let ident = AnyRuntime::for_kind(&self.config.places, kind)
                .identity(id, found.resolved.as_ref().and_then(|r| r.bundle.as_ref()));
            (ident.name, ident.image, ident.pod)
        };
        let cref = ContainerRef {
            id: id.as_str().to_owned(),
            name,
            image,
            runtime: found.runtime,
            pod,
        };
        (cref, setup, ask)
    }
}

/// What the filters know of a container once its identity is known.
pub(super) fn facts_of(c: &ContainerRef) -> Facts<'_> {
    let pod = c.pod.as_ref();
    Facts {
        id: &c.id,
        runtime: Some(c.runtime.as_str()),
        meta: Some(Meta {
            name: c.name.as_deref(),
            image: c.image.as_deref(),
            labels: None,
            namespace: pod.and_then(|p| p.namespace.as_deref()),
            pod: pod.and_then(|p| p.name.as_deref()),
        }),
    }
}

/// Where [`Daemon::locate`] found a container.
enum Located {
    /// On disk.
    Found(Box<Found>),
    /// A Docker container only an engine can place.
    Ask,
    /// Not a container fsmon monitors (logged).
    NotMonitored,
}
