//! The records of armed containers: the watcher's outputs printed, or held behind a
//! `container_start` that waits for the container's name, and `container_stop`.

use super::{arm::facts_of, *};

impl Daemon {
    /// Reads and prints every pending file event.
    pub(super) fn drain_watcher(&mut self) -> anyhow::Result<()> {
        let mut outputs = std::mem::take(&mut self.outputs);
        if let Err(e) = self.watcher.read_events(&mut outputs) {
            tracing::error!(error = %e, "reading inotify events");
        }
        let now = SystemTime::now();
        let enc = record::FileEncoder::new(now);
        let mut result = Ok(());
        for o in outputs.drain(..) {
            result = self.output(now, &enc, o);
            if result.is_err() {
                break;
            }
        }
        outputs.clear();
        self.outputs = outputs;
        result
    }

    /// Prints one output of the watcher (observed at `now`, encoded by `enc`), or holds
    /// it behind its container's `container_start` while that waits for a name.
    pub(super) fn output(
        &mut self,
        now: SystemTime,
        enc: &record::FileEncoder,
        o: WatchOutput,
    ) -> anyhow::Result<()> {
        if let Some(id) = o.container() {
            if let Some(held) = self
                .containers
                .get_mut(id.as_str())
                .and_then(|c| c.held.as_mut())
            {
                let id = id.as_str().to_owned();
                held.outputs.push((now, o));
                if held.outputs.len() >= HELD_MAX {
                    tracing::warn!(container_id = %id, "too many records held for the container's name; printing them without");
                    self.release(&id, None)?;
                }
                return Ok(());
            }
        }
        match o {
            WatchOutput::File(ev) => {
                let Some(c) = self.containers.get(ev.container.as_str()) else {
                    return Ok(());
                };
                if ev.kind == FileKind::Create && c.setup.contains(&ev.path) {
                    return Ok(());
                }
                if !self
                    .config
                    .records
                    .keeps(ev.kind.as_str(), &ev.path, ev.old_path.as_deref())
                {
                    return Ok(());
                }
                enc.encode(&mut self.pending_out, &c.encoded, &ev);
                self.stats.file_record(ev.kind);
                self.write_if_large()?;
            }
            WatchOutput::Exited { container } => {
                if self.containers.contains_key(container.as_str()) {
                    tracing::debug!(container_id = %container, "exited (cgroup.events populated 0)");
                    self.stop(container.as_str())?;
                }
            }
            WatchOutput::Overflow { container, reason } => {
                let c = container
                    .as_ref()
                    .and_then(|id| self.containers.get(id.as_str()))
                    .map(|c| c.cref.clone());
                if container.is_some() && c.is_none() {
                    return Ok(());
                }
                tracing::warn!(container_id = ?container, reason, "events lost; rescanning");
                let line = record::overflow(now, c.as_ref(), reason);
                self.emit(&line)?;
            }
        }
        Ok(())
    }

    /// Prints the held `container_start` of container `id` (with `meta` when it came),
    /// then what it did meanwhile, in order.
    pub(super) fn release(&mut self, id: &str, meta: Option<ContainerMeta>) -> anyhow::Result<()> {
        let Some(c) = self.containers.get_mut(id) else {
            return Ok(());
        };
        let Some(held) = c.held.take() else {
            return Ok(());
        };
        let meta = meta.unwrap_or_else(|| self.runtime.cached_meta(id));
        c.cref.name = c.cref.name.take().or(meta.name);
        c.cref.image = c.cref.image.take().or(meta.image);
        c.encoded = c.cref.encoded();
        if self.config.containers.decide(&facts_of(&c.cref)) == Decision::Skip {
            // Excluded once its name and image came: nothing of it is printed.
            tracing::debug!(container_id = %id, "excluded by the filters; watch removed");
            self.watcher.remove_container(id);
            self.containers.remove(id);
            self.excluded.insert(id.to_owned());
            return Ok(());
        }
        let line = record::container_start(
            held.at,
            &c.cref,
            &held.upperdir,
            held.freeze_us,
            held.arm_us,
            held.gated_us,
        );
        self.emit(&line)?;
        let mut enc: Option<(SystemTime, record::FileEncoder)> = None;
        for (t, o) in held.outputs {
            if enc.as_ref().is_none_or(|(et, _)| *et != t) {
                enc = Some((t, record::FileEncoder::new(t)));
            }
            if let Some((_, e)) = &enc {
                self.output(t, e, o)?;
            }
        }
        Ok(())
    }

    pub(super) fn stop(&mut self, id: &str) -> anyhow::Result<()> {
        // Its held records go out first, behind its `container_start`.
        self.release(id, None)?;
        self.watcher.remove_container(id);
        if let Some(c) = self.containers.remove(id) {
            let line = record::container_stop(SystemTime::now(), &c.cref);
            self.emit(&line)?;
        }
        Ok(())
    }
}
