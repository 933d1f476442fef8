-- route-to-dicom-node.lua: Orthanc auto-routing to dicom-node.
--
-- When a study becomes stable in Orthanc (no new instance for "StableAge" seconds), send
-- its original image series to dicom-node by C-STORE. dicom-node analyses them and sends
-- a DICOM SEG, an SR, key images (Secondary Capture, modality OT) and a Key Object
-- Selection (KO) back into the same study in Orthanc.
--
-- Loop safety: the results coming back make the study stable again, so this script runs
-- again. It never routes what dicom-node produced (series whose Manufacturer is
-- "dicom-node") nor non-image objects (SEG, SR, KO, PR, ...), and it does not re-send a
-- series it has already sent unchanged. A study with nothing left to send is skipped.
-- dicom-node itself also ignores duplicates and its own results, so even a re-send never
-- starts a second analysis.
--
-- Install: list this file in Orthanc's "LuaScripts" (see orthanc-dicom-node.json and
-- docs/orthanc.md). Orthanc runs all its Lua scripts in one shared context: if another
-- script already defines OnStableStudy, OnJobSuccess or OnJobFailure, keep one definition
-- of each and call DicomNodeRouteStudy(studyId) / DicomNodeJobEnded(jobId, ok) from it.
-- Written for Orthanc 1.10 (Debian 12) and later.

---------------------------------------------------------------------------------------
-- Settings: edit these.
---------------------------------------------------------------------------------------

-- The modality name of dicom-node in Orthanc's "DicomModalities" (not its AE title).
DICOM_NODE_MODALITY = "dicom-node"

-- Modalities of the series to send. CT only by default; for example { CT = true, MR = true }.
DICOM_NODE_ROUTE_MODALITIES = { CT = true }

-- Never sent, whatever the list above says: dicom-node's own results and other
-- non-image objects (they could never be analysed and must not loop back).
DICOM_NODE_SKIP_MODALITIES = { SEG = true, SR = true, KO = true, PR = true, RTSTRUCT = true,
                               DOC = true, REG = true, OT = true }
DICOM_NODE_SKIP_MANUFACTURERS = { ["dicom-node"] = true }  -- compared trimmed, case-insensitive

-- Skip series whose first instance has ImageType DERIVED (reformats, MIPs): the analyses
-- want ORIGINAL acquisitions. Set to false to send them too.
DICOM_NODE_SKIP_DERIVED = true

-- Send through Orthanc's job engine (true) so that this script never holds Orthanc's Lua
-- lock during a transfer; failed sends are visible under /jobs and are retried at the
-- study's next stable event.
DICOM_NODE_ASYNCHRONOUS = true

---------------------------------------------------------------------------------------

-- What was sent during this run of Orthanc: series ID -> instance count sent.
-- (In memory: after a restart of Orthanc an updated study is sent again in full, which
-- dicom-node answers as duplicates without a new analysis.)
local sent = {}
-- Jobs in flight: job ID -> { series ID = instance count }.
local pending = {}

local function trim(value)
   return (string.gsub(value or "", "^%s*(.-)%s*$", "%1"))
end

local function log(message)
   print("dicom-node routing: " .. message)
end

-- True when the first instance of the series says DERIVED in ImageType (0008,0008).
local function isDerived(series)
   local first = series["Instances"][1]
   if first == nil then
      return false
   end
   local ok, imageType = pcall(RestApiGet, "/instances/" .. first .. "/content/0008-0008", true)
   if not ok or imageType == nil then
      return false  -- no ImageType: treat as an original image
   end
   return string.upper(trim(imageType)):sub(1, 7) == "DERIVED"
end

-- Why a series is not sent (nil when it is).
local function skipReason(series)
   local tags = series["MainDicomTags"] or {}
   local modality = string.upper(trim(tags["Modality"]))
   if DICOM_NODE_SKIP_MANUFACTURERS[string.lower(trim(tags["Manufacturer"]))] then
      return "produced by dicom-node"
   end
   if DICOM_NODE_SKIP_MODALITIES[modality] then
      return "modality " .. modality .. " is never routed"
   end
   if not DICOM_NODE_ROUTE_MODALITIES[modality] then
      return "modality " .. (modality ~= "" and modality or "(none)") .. " not routed"
   end
   if #series["Instances"] == 0 then
      return "no instances"
   end
   if sent[series["ID"]] == #series["Instances"] then
      return "already sent unchanged"
   end
   if DICOM_NODE_SKIP_DERIVED and isDerived(series) then
      return "ImageType DERIVED"
   end
   return nil
end

local function submit(studyId, selected, counts)
   local request = { Resources = selected }
   if DICOM_NODE_ASYNCHRONOUS then
      request["Asynchronous"] = true
   end
   local answer = RestApiPost("/modalities/" .. DICOM_NODE_MODALITY .. "/store",
                              DumpJson(request, true), true)
   for id, count in pairs(counts) do
      sent[id] = count  -- at once, so that a second stable event does not queue it twice
   end
   local job = DICOM_NODE_ASYNCHRONOUS and answer and ParseJson(answer)["ID"] or nil
   if job ~= nil then
      pending[job] = counts
   end
   log("study " .. studyId .. ": sending " .. #selected .. " series to " ..
       DICOM_NODE_MODALITY .. (job and (" (job " .. job .. ")") or ""))
end

-- Send the routable series of one Orthanc study (its Orthanc ID) to dicom-node.
function DicomNodeRouteStudy(studyId)
   local seriesList = ParseJson(RestApiGet("/studies/" .. studyId .. "/series", true))
   local selected, counts = {}, {}
   for _, series in ipairs(seriesList) do
      local reason = skipReason(series)
      if reason == nil then
         table.insert(selected, series["ID"])
         counts[series["ID"]] = #series["Instances"]
      else
         log("study " .. studyId .. ": series " .. series["ID"] .. " skipped: " .. reason)
      end
   end
   if #selected == 0 then
      log("study " .. studyId .. ": nothing to send")
      return
   end
   submit(studyId, selected, counts)
end

-- A routing job ended: forget it, or on failure let the next stable event send again.
function DicomNodeJobEnded(jobId, ok)
   local counts = pending[jobId]
   if counts == nil then
      return
   end
   pending[jobId] = nil
   if not ok then
      for id, count in pairs(counts) do
         if sent[id] == count then
            sent[id] = nil
         end
      end
      log("job " .. jobId .. " failed: see /jobs/" .. jobId .. "; check the modality with " ..
          "/modalities/" .. DICOM_NODE_MODALITY .. "/echo and send the study again")
   end
end

function OnStableStudy(studyId, tags, metadata)
   DicomNodeRouteStudy(studyId)
end

function OnJobSuccess(jobId)
   DicomNodeJobEnded(jobId, true)
end

function OnJobFailure(jobId)
   DicomNodeJobEnded(jobId, false)
end

log("loaded: stable studies go to modality '" .. DICOM_NODE_MODALITY .. "'")
